"""``python -m examples.bookinfo up | apply NAME... | remove NAME... | status | load |
scenarios``

``up`` starts the control plane (with its CA) and every Bookinfo workload, prints the product
page URL and a live status line, and stops everything on Ctrl-C (or SIGTERM). The other
commands talk to the running mesh through its work directory (``--workdir``, default
``$PYMESH_BOOKINFO_DIR`` or ``/tmp/pymesh-bookinfo-UID``): ``apply`` writes a scenario into
the config the control plane watches and returns once every workload has ACKed it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from examples.bookinfo.launcher import (
    Bookinfo,
    BookinfoError,
    ConfigLayers,
    _get_json,
    apply_layers,
    resolve_scenario,
    scenario_names,
)

STATE_FILE = "state.json"


def default_workdir() -> Path:
    env = os.environ.get("PYMESH_BOOKINFO_DIR")
    return Path(env) if env else Path(f"/tmp/pymesh-bookinfo-{os.getuid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _state(workdir: Path) -> dict[str, Any]:
    try:
        state = json.loads((workdir / STATE_FILE).read_text())
    except (OSError, ValueError):
        raise BookinfoError(
            f"no running Bookinfo in {workdir} (start it with `python -m examples.bookinfo up`)"
        ) from None
    if not _alive(int(state.get("pid", 0))):
        raise BookinfoError(f"the Bookinfo launcher (pid {state.get('pid')}) is not running")
    return dict(state)


class _Stop(Exception):
    pass


def _status_line(status: dict[str, Any], total: int) -> str:
    down = [n for n, w in status["workloads"].items() if not w["connected"]]
    line = (
        f"workloads connected {status['connected']}/{total}"
        f" | productpage {status['requests_per_second']:.1f} req/s ({status['requests']} total)"
        f" | config v{status['config_version']} | applied: {', '.join(status['applied'])}"
    )
    if down:
        line += f" | not connected: {', '.join(down)}"
    return line


def cmd_up(args: argparse.Namespace) -> int:
    workdir: Path = args.workdir
    state_path = workdir / STATE_FILE
    if state_path.exists():
        try:
            old = json.loads(state_path.read_text())
            if _alive(int(old.get("pid", 0))):
                print(f"Bookinfo already runs in {workdir} (pid {old['pid']})", file=sys.stderr)
                return 1
        except (OSError, ValueError):
            pass
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    # the control plane runs in this process: its log goes to a file, the terminal shows status
    logging.basicConfig(
        filename=workdir / "logs" / "control-plane.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    def on_signal(signum: int, frame: object) -> None:
        raise _Stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bookinfo = Bookinfo(
        workdir, mtls=not args.no_mtls, base_port=args.base_port or None, log_level=args.log_level
    )
    print(f"Starting Bookinfo (work directory {workdir}) ...", flush=True)
    try:
        bookinfo.start(timeout=args.timeout)
        state = {
            "pid": os.getpid(),
            "workdir": str(workdir),
            "productpage_url": bookinfo.page_url,
            "admin_url": bookinfo.admin_url,
            "xds_address": bookinfo.xds_address,
            "services": {
                n: {"pid": p.pid, "port": p.port, "grpc_port": p.grpc_port}
                for n, p in bookinfo.services.items()
            },
        }
        state_path.write_text(json.dumps(state, indent=2))
        print(f"Bookinfo is up: {bookinfo.page_url}", flush=True)
        print(f"control plane: xDS {bookinfo.xds_address}, admin {bookinfo.admin_url}", flush=True)
        print(
            "apply a scenario: python -m examples.bookinfo apply reviews-50-v3"
            + ("" if args.workdir == default_workdir() else f" --workdir {workdir}"),
            flush=True,
        )
        print(f"logs: {workdir / 'logs'}; Ctrl-C stops everything.", flush=True)
        last, last_at = "", 0.0
        bookinfo.status()  # starts the request-rate window
        while True:
            time.sleep(args.interval)
            try:
                line = _status_line(bookinfo.status(), len(bookinfo.services))
            except (OSError, BookinfoError) as exc:
                line = f"status unavailable: {exc}"
            now = time.monotonic()
            if line != last or now - last_at >= 30:
                print(line, flush=True)
                last, last_at = line, now
    except _Stop:
        pass
    except BookinfoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("Stopping Bookinfo ...", flush=True)
        bookinfo.stop()
        state_path.unlink(missing_ok=True)
        print("Bookinfo stopped.", flush=True)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    state = _state(args.workdir)
    add = []
    for item in args.scenarios:
        name, path = resolve_scenario(item)
        add.append((name, path.read_text()))
    version = apply_layers(ConfigLayers(args.workdir), state["admin_url"], add, (), args.timeout)
    print(
        f"applied {', '.join(n for n, _ in add)}: config version {version}, ACKed by every workload"
    )
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    state = _state(args.workdir)
    layers = ConfigLayers(args.workdir)
    known = set(layers.names())
    names = []
    for item in args.scenarios:
        stem = Path(item).stem if item.endswith((".yaml", ".yml")) else item
        for candidate in (stem, f"virtual-service-{stem}", f"destination-rule-{stem}"):
            if candidate in known:
                names.append(candidate)
                break
        else:  # like kubectl delete: say so, remove the others
            print(f"not applied: {item}", file=sys.stderr)
    if not names:
        return 1
    version = apply_layers(layers, state["admin_url"], (), names, args.timeout)
    print(f"removed {', '.join(names)}: config version {version}, ACKed by every workload")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = _state(args.workdir)
    configz = _get_json(f"{state['admin_url']}/debug/configz")
    connected = {
        f"{w['labels'].get('app')}-{w['labels'].get('version')}"
        for w in configz.get("workloads") or ()
        if w.get("connected")
    }
    print(f"product page: {state['productpage_url']}")
    applied = ", ".join(ConfigLayers(args.workdir).names())
    print(f"config version {configz.get('version')}, applied: {applied}")
    for name, svc in state["services"].items():
        flag = "connected" if name in connected else "NOT CONNECTED"
        print(f"  {name:15} pid {svc['pid']:<7} port {svc['port']:<6} {flag}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    """Load the product page COUNT times (as USER) and tally what the pages showed, the way
    Istio's task pages say "refresh the browser several times"."""
    from collections import Counter

    from examples.bookinfo.client import User

    state = _state(args.workdir)
    base = state["productpage_url"].rsplit("/productpage", 1)[0]
    seen: Counter[str] = Counter()
    elapsed = []
    with User(base) as user:
        if args.user:
            user.login(args.user)
        for _ in range(args.count):
            page = user.page()
            elapsed.append(page.elapsed)
            if page.status != 200:
                seen[f"HTTP {page.status}"] += 1
            elif page.errors:
                seen["; ".join(page.errors)] += 1
            elif page.rating_errors:
                seen[page.rating_errors[0]] += 1
            elif page.stars:
                seen[f"{'/'.join(sorted(page.star_colors))} stars"] += 1
            else:
                seen["no stars"] += 1
            if args.interval:
                time.sleep(args.interval)
    who = args.user or "anonymous"
    elapsed.sort()
    print(
        f"{args.count} loads as {who}: median {elapsed[len(elapsed) // 2] * 1000:.0f} ms,"
        f" max {elapsed[-1] * 1000:.0f} ms"
    )
    for what, n in seen.most_common():
        print(f"  {n:5}  {what}")
    return 0


def cmd_scenarios(args: argparse.Namespace) -> int:
    for name in scenario_names():
        print(name)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.bookinfo",
        description="Istio's Bookinfo on pymesh: `up` starts the control plane and every "
        "workload (Ctrl-C stops them); the other commands talk to the running mesh.",
        epilog="example: python -m examples.bookinfo up, then in another terminal: "
        "python -m examples.bookinfo apply all-v1 reviews-test-v2",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the control plane and every service")
    up.add_argument(
        "--base-port", type=int, default=9080, help="productpage's port (0: free ports)"
    )
    up.add_argument(
        "--no-mtls", action="store_true", help="destination-rule-all instead of -all-mtls"
    )
    up.add_argument("--interval", type=float, default=2.0, help="seconds between status lines")
    up.add_argument("--timeout", type=float, default=120.0, help="start timeout")
    up.add_argument(
        "--log-level", default="INFO", help="services' log level (logs in WORKDIR/logs)"
    )
    up.set_defaults(func=cmd_up)
    for name, func, help_text in (
        ("apply", cmd_apply, "apply scenarios (Istio networking sample names or YAML files)"),
        ("remove", cmd_remove, "remove applied scenarios"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("scenarios", nargs="+")
        p.add_argument("--timeout", type=float, default=30.0)
        p.set_defaults(func=func)
    sub.add_parser("status", help="workloads of the running mesh").set_defaults(func=cmd_status)
    load = sub.add_parser("load", help="load the product page and tally what it shows")
    load.add_argument("--count", type=int, default=20)
    load.add_argument("--user", default=None, help="log in as this user first (e.g. jason)")
    load.add_argument("--interval", type=float, default=0.0, help="seconds between loads")
    load.set_defaults(func=cmd_load)
    sub.add_parser("scenarios", help="list Istio's networking samples").set_defaults(
        func=cmd_scenarios
    )
    for p in sub.choices.values():
        p.add_argument(
            "--workdir",
            type=Path,
            default=default_workdir(),
            help="work directory ($PYMESH_BOOKINFO_DIR, default /tmp/pymesh-bookinfo-UID)",
        )
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BookinfoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
