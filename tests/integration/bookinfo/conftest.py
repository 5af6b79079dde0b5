"""Fixtures for the Bookinfo end-to-end tests: one running Bookinfo for the whole session.

``bookinfo`` is :class:`examples.bookinfo.mesh.Bookinfo` (control plane with its CA, six
workload processes, mTLS on: Istio's destination-rule-all-mtls.yaml), started once (about
5 s) and shared by every Bookinfo test module. Each test leaves it as it found it:
``fresh_bookinfo`` (autouse) puts back the config layers in force before the test (what a
module fixture applied stays) and restarts any workload the test stopped. ``user`` makes
logged-in or anonymous :class:`examples.bookinfo.client.User` clients (closed after the
test); ``mesh_user`` the same from inside the mesh (mTLS with its own identity, works under
STRICT).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from examples.bookinfo.client import User
from examples.bookinfo.mesh import Bookinfo


@pytest.fixture(scope="session")
def bookinfo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bookinfo]:
    with Bookinfo(tmp_path_factory.mktemp("bookinfo")) as mesh:
        yield mesh


@pytest.fixture(autouse=True)
def fresh_bookinfo(request: pytest.FixtureRequest) -> Iterator[None]:
    """Around a test that uses ``bookinfo``: after it, the config layers are back to what they
    were before it (what module fixtures applied stays) and every workload runs."""
    if "bookinfo" not in request.fixturenames:
        yield
        return
    mesh: Bookinfo = request.getfixturevalue("bookinfo")
    before = mesh.snapshot()
    yield
    if mesh.control_plane is not None:
        mesh.restore(before)
        mesh.ensure_running()


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


@pytest.fixture
def mesh_user(bookinfo: Bookinfo) -> Iterator[Callable[[str | None], User]]:
    """Like ``user``, but the client is inside the mesh (as Istio's ingress gateway): a
    pymesh.httpx client with its own SPIFFE identity (service account bookinfo-gateway)
    calling http://productpage:9080 with mTLS, so it still works under STRICT."""
    made: list[User] = []

    def make(name: str | None = None) -> User:
        client = bookinfo.mesh_user(name)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
