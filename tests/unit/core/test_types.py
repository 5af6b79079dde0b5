"""The hot-path frozen types keep their dataclass behaviour with their hand-written
``__init__`` (slot stores instead of ``object.__setattr__``)."""

from __future__ import annotations

import dataclasses

import pytest

from pymesh.core.deadline import Deadlines
from pymesh.core.types import Headers, Outcome, PickContext, RequestInfo, ResetKind


def test_request_info_is_a_frozen_dataclass_with_its_defaults() -> None:
    r = RequestInfo("GET", "svc:80", "/x")
    assert (r.headers, r.scheme, r.source_ip, r.grpc) == (Headers(), "http", None, False)
    assert r == RequestInfo("GET", "svc:80", "/x", Headers(), "http", None, False)
    assert hash(r) == hash(RequestInfo("GET", "svc:80", "/x"))
    assert r != RequestInfo("GET", "svc:80", "/y")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.path = "/y"  # type: ignore[misc]
    assert dataclasses.replace(r, path="/y").path == "/y"
    assert [f.name for f in dataclasses.fields(r)] == [
        "method", "authority", "path", "headers", "scheme", "source_ip", "grpc",
    ]  # fmt: skip
    assert RequestInfo(method="POST", authority="a", path="/p", grpc=True).grpc is True


def test_pick_context_outcome_and_deadlines_are_frozen_with_defaults() -> None:
    pick = PickContext(1.0)
    assert (pick.hash_key, pick.excluded, pick.host_selection_attempts) == (None, frozenset(), 1)
    assert pick == PickContext(1.0, None, frozenset(), 1)
    outcome = Outcome(reset=ResetKind.RESET)
    assert (outcome.status, outcome.grpc_status, outcome.headers) == (None, None, Headers())
    assert Outcome(status=200, grpc_status=0) == Outcome(200, None, 0)
    deadlines = Deadlines(5.0, None)
    assert deadlines == Deadlines(5.0, None, None, False, None, None, False)
    assert deadlines.starting_at(100.0).overall == 105.0
    assert Deadlines(None, 1.0).starting_at(100.0) == Deadlines(None, 1.0)
    for obj, name in ((pick, "now"), (outcome, "status"), (deadlines, "overall")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, 0)
