"""Fixtures for the Bookinfo end-to-end tests: one running Bookinfo per test module.

``bookinfo`` is :class:`examples.bookinfo.mesh.Bookinfo` (control plane with its CA, six
workload processes, mTLS on: Istio's destination-rule-all-mtls.yaml). Each test leaves the
mesh as it found it: ``fresh_config`` (autouse) removes every layer a test applied.
``user`` makes logged-in or anonymous :class:`examples.bookinfo.client.User` clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from examples.bookinfo.client import User
from examples.bookinfo.mesh import Bookinfo


@pytest.fixture(scope="module")
def bookinfo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bookinfo]:
    workdir: Path = tmp_path_factory.mktemp("bookinfo")
    with Bookinfo(workdir) as mesh:
        yield mesh


@pytest.fixture(autouse=True)
def fresh_config(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used ``bookinfo``, remove the scenarios it applied."""
    yield
    if "bookinfo" in request.fixturenames:
        mesh: Bookinfo = request.getfixturevalue("bookinfo")
        if mesh.control_plane is not None:
            mesh.reset()


@pytest.fixture
def user(bookinfo: Bookinfo) -> Iterator[Callable[[str | None], User]]:
    """``user("jason")``: a client logged in as jason; ``user(None)``: anonymous."""
    made: list[User] = []

    def make(name: str | None = None) -> User:
        client = User(bookinfo.productpage_url)
        made.append(client)
        if name:
            client.login(name)
        return client

    yield make
    for client in made:
        client.close()
