"""The Bookinfo application itself: its API against Istio's swagger.yaml, the strings of the
originals, header propagation, the gRPC hop, the copies of Istio's samples, and the one
command (``python -m examples.bookinfo up``) started and stopped like a user would."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from examples.bookinfo.client import DETAILS_ERROR, RATINGS_UNAVAILABLE, User
from examples.bookinfo.launcher import REPO_ROOT, _get_json
from examples.bookinfo.mesh import (
    MESH_DIR,
    NETWORKING_DIR,
    Bookinfo,
    BookinfoError,
    ConfigLayers,
    resolve_scenario,
)

_TYPES = {"integer": int, "string": str, "array": list, "object": dict}


def check_schema(
    value: Any, schema: dict[str, Any], definitions: dict[str, Any], where: str
) -> None:
    """A small swagger 2.0 check: ``$ref``, type, required, properties, items, enum."""
    if "$ref" in schema:
        schema = definitions[schema["$ref"].rsplit("/", 1)[1]]
    kind = schema.get("type", "object")
    assert isinstance(value, _TYPES[kind]) and not isinstance(value, bool), (where, value)
    if "enum" in schema:
        assert value in schema["enum"], (where, value)
    if kind == "array":
        for i, item in enumerate(value):
            check_schema(item, schema["items"], definitions, f"{where}[{i}]")
    if kind == "object":
        for name in schema.get("required", ()):
            assert name in value, f"{where}: {name} missing in {value}"
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                check_schema(value[name], sub, definitions, f"{where}.{name}")


@pytest.fixture(scope="module")
def swagger(bookinfo_dir: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((bookinfo_dir / "swagger.yaml").read_text()))


def test_api_matches_swagger(bookinfo: Bookinfo, swagger: dict[str, Any]) -> None:
    defs = swagger["definitions"]
    base = f"{bookinfo.productpage_url}/api/v1"
    with httpx.Client(timeout=10) as client:
        products = client.get(f"{base}/products")
        assert products.status_code == 200
        assert products.headers["content-type"] == "application/json"
        check_schema(
            products.json(),
            {"type": "array", "items": {"$ref": "#/definitions/Product"}},
            defs,
            "products",
        )
        assert products.json()[0]["title"] == "The Comedy of Errors"

        details = client.get(f"{base}/products/0").json()
        check_schema(details, {"$ref": "#/definitions/ProductDetails"}, defs, "details")
        assert details == {
            "id": 0,
            "author": "William Shakespeare",
            "year": 1595,
            "type": "paperback",
            "pages": 200,
            "publisher": "PublisherA",
            "language": "English",
            "ISBN-10": "1234567890",
            "ISBN-13": "123-1234567890",
        }

        bookinfo.apply("reviews-v2")
        reviews = client.get(f"{base}/products/0/reviews").json()
        # The original reviews service (Java) writes the id as a string ("0") where the
        # swagger says integer; kept as the original does.
        assert reviews["id"] == "0"
        check_schema(dict(reviews, id=0), {"$ref": "#/definitions/ProductReviews"}, defs, "reviews")
        assert reviews["podname"] == "reviews-v2" and reviews["clustername"] == "null"
        assert [r["rating"] for r in reviews["reviews"]] == [
            {"stars": 5, "color": "black"},
            {"stars": 4, "color": "black"},
        ]

        ratings = client.get(f"{base}/products/0/ratings").json()
        # swagger: values are strings; the original ratings service (Node.js) sends numbers
        check_schema(ratings, {"$ref": "#/definitions/ProductRatings"}, defs, "ratings")
        assert ratings == {"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}


def test_services_strings_and_errors(bookinfo: Bookinfo) -> None:
    """The services' own answers (straight to their ports: PERMISSIVE accepts plaintext)."""
    svc = bookinfo.services
    with httpx.Client(timeout=10) as client:
        r = client.get(f"{svc['details-v1'].url}/details/abc")
        assert (r.status_code, r.json()) == (400, {"error": "please provide numeric product id"})
        assert client.get(f"{svc['details-v1'].url}/health").json() == {
            "status": "Details is healthy"
        }
        ratings = svc["ratings-v1"].url
        r = client.get(f"{ratings}/ratings/x")
        assert (r.status_code, r.json()) == (400, {"error": "please provide numeric product ID"})
        r = client.post(f"{ratings}/ratings/7", content=b"{not json")
        assert (r.status_code, r.json()) == (400, {"error": "please provide valid ratings JSON"})
        r = client.post(f"{ratings}/ratings/7", json={"Reviewer1": 1, "Reviewer2": 2})
        assert r.json() == {"id": 7, "ratings": {"Reviewer1": 1, "Reviewer2": 2}}
        assert client.get(f"{ratings}/ratings/7").json() == r.json()
        v1 = client.get(f"{svc['reviews-v1'].url}/reviews/0").json()
        assert "rating" not in v1["reviews"][0]
        assert v1["reviews"][0]["text"].startswith("An extremely entertaining play")
        assert client.get(f"{bookinfo.productpage_url}/health").text == "Product page is healthy"


def _ratings_stats(
    bookinfo: Bookinfo, path: str, before: int, timeout: float = 5.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = bookinfo.services["ratings-v1"].stats()
        if stats["paths"].get(path, 0) > before or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def test_grpc_and_http_hops_propagate_headers(
    bookinfo: Bookinfo, user: Callable[[str | None], User]
) -> None:
    """reviews v2 calls ratings over HTTP, v3 over gRPC; both carry productpage's end-user,
    x-request-id, B3 and W3C headers."""
    jason = user("jason")
    for version, path, color in (
        ("v2", "/ratings/0", "black"),
        ("v3", "/bookinfo.ratings.v1.Ratings/GetRatings", "red"),
    ):
        bookinfo.apply(f"reviews-{version}")
        before = bookinfo.services["ratings-v1"].stats()["paths"].get(path, 0)
        request_id = f"test-{version}-{time.time_ns()}"
        jason.client.headers["x-request-id"] = request_id
        page = jason.page()
        assert page.star_colors == {color}
        stats = _ratings_stats(bookinfo, path, before)
        assert stats["paths"].get(path, 0) > before, (version, stats)
        seen = stats["last_headers"]
        assert seen["end-user"] == "jason"
        assert seen["x-request-id"] == request_id
        trace = seen["x-b3-traceid"]
        assert len(trace) == 32 and seen["x-b3-spanid"] and seen["x-b3-sampled"] == "1"
        assert seen["traceparent"].split("-")[1] == trace


STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: default
spec:
  mtls:
    mode: STRICT
"""


def test_every_hop_is_mutual_tls(
    bookinfo: Bookinfo, mesh_user: Callable[[str | None], User]
) -> None:
    """Under namespace-wide STRICT every hop still works (productpage -> details/reviews over
    HTTP, reviews v2 -> ratings over HTTP, reviews v3 -> ratings over gRPC), so each is mTLS;
    a plaintext client is refused."""
    bookinfo.apply_yaml(STRICT, name="strict")
    with pytest.raises(httpx.TransportError):
        httpx.get(bookinfo.page_url, timeout=5)
    jason = mesh_user("jason")
    for scenario, color in (("reviews-v2", "black"), ("reviews-v3", "red")):
        bookinfo.apply(scenario)
        page = jason.page()
        assert page.status == 200 and page.user == "jason" and page.details_ok
        assert page.star_colors == {color} and page.rating_errors == ()


def test_networking_samples_are_istios(bookinfo_dir: Path) -> None:
    ours = sorted(p.name for p in NETWORKING_DIR.glob("*.yaml"))
    istio = sorted(p.name for p in (bookinfo_dir / "networking").glob("*.yaml"))
    assert ours == istio and len(ours) >= 16
    _, mismatch, errors = filecmp.cmpfiles(
        NETWORKING_DIR, bookinfo_dir / "networking", ours, shallow=False
    )
    assert (mismatch, errors) == ([], [])


def _descendants(pid: int) -> list[int]:
    out = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(status.parent.name)
            out += [child, *_descendants(child)]
    return out


@pytest.mark.slow  # a second whole mesh: about 8-15 s on the shared box
def test_up_command_starts_and_stops_cleanly(tmp_path: Path) -> None:
    """The README's main command: starts everything, prints the URL, serves the page, and
    on Ctrl-C (SIGINT) stops with no process left behind."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "examples.bookinfo",
            "up",
            "--base-port",
            "0",
            "--workdir",
            str(tmp_path),
            "--interval",
            "0.5",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    children: list[int] = []
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 60
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Bookinfo is up: "):
                url = line.split(": ", 1)[1].strip()
        assert url, "".join(lines)
        assert httpx.get(url, timeout=10).text.count("Book Reviews") == 1
        state = json.loads((tmp_path / "state.json").read_text())
        assert state["productpage_url"] == url and len(state["services"]) == 6
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "examples.bookinfo",
                "apply",
                "reviews-v3",
                "--workdir",
                str(tmp_path),
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert 'color="red"' in httpx.get(url, timeout=10).text
        load = subprocess.run(
            [
                sys.executable,
                "-m",
                "examples.bookinfo",
                "load",
                "--count=5",
                f"--workdir={tmp_path}",
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert load.returncode == 0 and "    5  red stars" in load.stdout, load.stdout
        for _ in range(20):  # the status lines follow the start banner
            line = proc.stdout.readline()
            if line.startswith("workloads connected"):
                break
        assert line.startswith("workloads connected 6/6"), line
        children = _descendants(proc.pid)
        assert len(children) >= 6
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
        assert "Bookinfo stopped." in rest
        assert not (tmp_path / "state.json").exists()
        left = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        assert left == [], left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_stopped_workload_shows_the_originals_errors(
    bookinfo: Bookinfo, user: Callable[[str | None], User]
) -> None:
    """ratings down: reviews v2 shows "Ratings service is currently unavailable"; details
    down: productpage shows its details error; both come back when restarted."""
    bookinfo.apply("reviews-v2")
    anonymous = user(None)
    ratings = bookinfo.services["ratings-v1"]
    pid = ratings.pid
    ratings.kill()
    assert pid is not None and not Path(f"/proc/{pid}").exists() and ratings.pid is None
    page = anonymous.page()
    assert page.reviews_ok and page.stars == ()
    assert page.rating_errors == (RATINGS_UNAVAILABLE, RATINGS_UNAVAILABLE)
    bookinfo.services["details-v1"].stop()
    page = anonymous.page()
    assert page.errors == (DETAILS_ERROR,) and not page.details_ok
    assert bookinfo.ensure_running() == ["ratings-v1", "details-v1"]
    page = anonymous.page()
    assert page.details_ok and page.star_colors == {"black"}


def test_config_layers_work_like_kubectl_apply(tmp_path: Path) -> None:
    """A later layer replaces a resource (kind, namespace, name); removing it restores the
    earlier definition; the text of each document is kept."""
    layers = ConfigLayers(tmp_path)
    base = (MESH_DIR / "bookinfo.yaml").read_text()
    all_v1 = resolve_scenario("all-v1")[1].read_text()
    test_v2 = resolve_scenario("reviews-test-v2")[1].read_text()
    rules = resolve_scenario("destination-rule-all")[1].read_text()
    layers.commit([("bookinfo", base), ("rules", rules), ("all-v1", all_v1)])
    layers.commit(layers.plan([("virtual-service-reviews-test-v2", test_v2)]))
    text = layers.config_file.read_text()
    assert text.count("kind: VirtualService") == 4
    assert "# layer virtual-service-reviews-test-v2: VirtualService default/reviews" in text
    assert "# layer all-v1: VirtualService default/reviews" not in text
    assert "exact: jason" in text
    layers.commit(layers.plan(remove=["virtual-service-reviews-test-v2"]))
    text = layers.config_file.read_text()
    assert "# layer all-v1: VirtualService default/reviews" in text
    assert "exact: jason" not in text
    assert layers.names() == ["bookinfo", "rules", "all-v1"]
    assert resolve_scenario("reviews-50-v3")[0] == "virtual-service-reviews-50-v3"
    assert resolve_scenario("ratings-delay-2s")[0] == "virtual-service-ratings-delay-2s"
    with pytest.raises(BookinfoError, match="unknown scenario"):
        resolve_scenario("reviews-v9")


BAD_SUBSET = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v9}
"""


def test_a_bad_scenario_is_refused_and_changes_nothing(bookinfo: Bookinfo) -> None:
    before = bookinfo.applied()
    config = bookinfo.layers.config_file.read_text()
    with pytest.raises(BookinfoError, match=r"spec\.http\[0\]\.route\[0\]\.destination\.subset"):
        bookinfo.apply_yaml(BAD_SUBSET, name="bad")
    assert bookinfo.applied() == before
    assert bookinfo.layers.config_file.read_text() == config
    assert _get_json(f"{bookinfo.admin_url}/debug/configz")["last_reload_errors"] == []
