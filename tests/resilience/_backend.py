"""A backend process for the fault tests: ``python _backend.py NAME MODE`` prints its port.

Modes: ``ok`` answers 200; ``flaky`` answers 503 to half of the requests (seeded random);
``grpc`` serves ``/echo.Echo/Who`` (answers NAME); ``hang`` accepts connections and never
answers (it writes the number of connections accepted to the file named by a third
argument). ``GET /_count`` answers the number of
requests seen so far (not counted itself).
"""

from __future__ import annotations

import json
import random
import socket
import sys
import threading
import time
from typing import Any


def _serve_hang(sock: socket.socket, count_file: str) -> None:
    held: list[socket.socket] = []
    while True:
        conn, _ = sock.accept()
        held.append(conn)  # never read, never answered, never closed
        with open(count_file, "w") as f:
            f.write(str(len(held)))


def _serve_grpc(sock: socket.socket, name: str) -> None:
    """``/echo.Echo/Who`` answers ``name`` (as tests/integration/grpc's EchoServer)."""
    from concurrent import futures

    import grpc

    port = sock.getsockname()[1]
    sock.close()  # grpc binds by itself (SO_REUSEPORT): hand the port over
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Who": grpc.unary_unary_rpc_method_handler(lambda r, c: name.encode())}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def main() -> None:
    name, mode = sys.argv[1], sys.argv[2]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    print(sock.getsockname()[1], flush=True)
    if mode == "hang":
        _serve_hang(sock, sys.argv[3])
        return
    if mode == "grpc":
        _serve_grpc(sock, name)
        return
    import uvicorn

    rng = random.Random(1)
    count = 0

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal count
        if scope["type"] != "http":
            return
        if scope["path"] == "/_count":
            status, body = 200, str(count).encode()
        else:
            count += 1
            status = 503 if mode == "flaky" and rng.random() < 0.5 else 200
            body = json.dumps({"name": name}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"x-backend", name.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    config = uvicorn.Config(app, log_level="error", lifespan="off", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    threading.Thread(target=lambda: (time.sleep(3600), sys.exit()), daemon=True).start()
    main()
