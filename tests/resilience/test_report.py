"""The report page is generated from what the tests recorded and how they ended."""

from __future__ import annotations

import datetime

from tests.resilience.conftest import Row, _Store, render


def test_render_rows_outcomes_and_totals() -> None:
    store = _Store()
    store.rows += [
        Row("endpoint killed", 1, 10_000, 0, 0, "tests/resilience/test_a.py::test_x"),
        Row("plaintext into STRICT", 1, 1, 0, 0, "tests/resilience/test_b.py::test_y", "refused"),
    ]
    store.outcomes.update(
        {
            "tests/resilience/test_a.py::test_x": "passed",
            "tests/resilience/test_b.py::test_y": "failed",
            "tests/resilience/test_c.py::test_z": "failed",  # failed before recording
        }
    )
    page = render(
        store,
        now=datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.UTC),
        command="nox -s resilience",
    )
    assert "- Date: 2026-01-02 03:04 UTC" in page
    assert "- Command: `nox -s resilience`" in page
    assert "| endpoint killed | 1 | 10,000 | 0 | 0 | passed | `test_a.py::test_x` |" in page
    assert "| plaintext into STRICT (refused) | 1 | 1 | 0 | 0 | failed |" in page
    assert "| test_z (failed before recording) | 0 | 0 | 0 | 0 | failed |" in page
    assert (
        "| **Total (3 classes)** | **2** | **10,001** | **0** | **0** | **1 passed, 2 not** |"
        in page
    )
