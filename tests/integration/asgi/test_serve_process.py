"""``pymesh.serve(app, port=...)`` as a program runs it: blocking, in the main thread, stopped
by SIGTERM with uvicorn's graceful shutdown (a request in flight completes), after which
uvicorn re-raises the signal (the process ends as killed by SIGTERM, as under uvicorn)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx

from tests.integration.asgi.conftest import Mesh

PROGRAM = textwrap.dedent(
    """\
    import asyncio
    import sys

    import pymesh


    async def app(scope, receive, send):
        if scope["type"] == "http":
            if scope["path"] == "/slow":
                open(sys.argv[2], "w").close()  # the test signals once the request is here
                await asyncio.sleep(1.0)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"served"})


    pymesh.serve(app, port=int(sys.argv[1]), host="127.0.0.1", log_level="warning")
    """
)


def test_serve_blocks_and_stops_on_sigterm(mesh: Mesh, tmp_path: Path) -> None:
    from pymesh.bootstrap import generate_bootstrap

    cp = mesh.start_cp()
    bootstrap = tmp_path / "bootstrap.json"
    bootstrap.write_text(
        json.dumps(
            generate_bootstrap(
                xds_address=cp.address,
                labels={"app": "web"},
                service_account="web",
                ip="127.0.0.1",
                cert_dir=str(mesh.cert_dir),
            )
        )
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "serve.py"
    arrived = tmp_path / "slow-arrived"
    script.write_text(PROGRAM)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_XDS_BOOTSTRAP")}
    env["GRPC_XDS_BOOTSTRAP"] = str(bootstrap)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[3])
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), str(arrived)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "pymesh.serve never served"
            time.sleep(0.1)
        assert r.text == "served"
        slow: list[httpx.Response | Exception] = []

        def in_flight() -> None:
            try:
                slow.append(httpx.get(f"http://127.0.0.1:{port}/slow", timeout=10))
            except httpx.TransportError as exc:
                slow.append(exc)

        thread = threading.Thread(target=in_flight)
        thread.start()
        deadline = time.monotonic() + 20
        while not arrived.exists():  # the request is in the app (no fixed sleep: CI is slow)
            assert time.monotonic() < deadline, "the slow request never reached the app"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
        thread.join(10)
        assert proc.returncode == -signal.SIGTERM, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
        (done,) = slow
        assert isinstance(done, httpx.Response) and done.status_code == 200, done
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
