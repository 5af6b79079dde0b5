"""The Bookinfo launcher: the control plane (with its CA), one process per workload, and the
mesh config as layers of Istio YAML that can be applied and removed while everything runs.

Config layers (``WORKDIR/layers/NNN-NAME.yaml``) work like ``kubectl apply``: a resource
(kind, namespace, name) defined by a later layer replaces the earlier definition, so applying
``reviews-test-v2`` after ``all-v1`` replaces the ``reviews`` VirtualService, and removing it
brings ``all-v1``'s back. The effective config is written atomically to one file
(``WORKDIR/config/bookinfo.yaml``) that the control plane watches and hot-reloads; an apply
returns once the control plane has pushed it and every workload has ACKed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

__all__ = [
    "MESH_DIR",
    "NETWORKING_DIR",
    "SERVICES",
    "Bookinfo",
    "BookinfoError",
    "ConfigLayers",
    "ServiceProc",
    "resolve_scenario",
    "scenario_names",
]

EXAMPLE_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLE_DIR.parent.parent
MESH_DIR = EXAMPLE_DIR / "mesh"
NETWORKING_DIR = MESH_DIR / "networking"
SCENARIOS_DIR = MESH_DIR / "scenarios"
"""Scenarios of Istio's task pages that are not among the networking samples (pymesh's)."""
BASE_CONFIG = MESH_DIR / "bookinfo.yaml"

SERVICES: tuple[tuple[str, str], ...] = (
    ("productpage", "v1"),
    ("details", "v1"),
    ("reviews", "v1"),
    ("reviews", "v2"),
    ("reviews", "v3"),
    ("ratings", "v1"),
)
"""(app, version) of every workload, in start order (what productpage calls starts first)."""

_START_ORDER = (
    "ratings-v1",
    "details-v1",
    "reviews-v1",
    "reviews-v2",
    "reviews-v3",
    "productpage-v1",
)


class BookinfoError(Exception):
    """Something in the Bookinfo example failed (start, apply, a bad scenario)."""


# -- scenarios -------------------------------------------------------------------------------


def resolve_scenario(name_or_path: str | Path) -> tuple[str, Path]:
    """``(layer name, file)`` of a scenario: a path to a YAML file, or a name of Istio's
    networking samples (``mesh/networking/``, then the task scenarios of ``mesh/scenarios/``)
    with or without its ``virtual-service-`` / ``destination-rule-`` prefix and ``.yaml``
    suffix (``reviews-50-v3`` is ``virtual-service-reviews-50-v3.yaml``)."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        return path.stem, path
    stem = text.removesuffix(".yaml").removesuffix(".yml")
    for directory in (NETWORKING_DIR, SCENARIOS_DIR):
        for candidate in (stem, f"virtual-service-{stem}", f"destination-rule-{stem}"):
            found = directory / f"{candidate}.yaml"
            if found.is_file():
                return candidate, found
    known = ", ".join(scenario_names())
    raise BookinfoError(f"unknown scenario {text!r}: give a YAML file or one of: {known}")


def scenario_names() -> list[str]:
    """Every scenario name :func:`resolve_scenario` knows (file stems)."""
    return sorted(p.stem for d in (NETWORKING_DIR, SCENARIOS_DIR) for p in d.glob("*.yaml"))


_SEPARATOR = re.compile(r"^---[ \t]*(?:#.*)?$", re.MULTILINE)


def _documents(text: str, source: str) -> list[tuple[tuple[str, str, str], str]]:
    """Split YAML text into documents, keyed by (kind, namespace, name); the text is kept."""
    out: list[tuple[tuple[str, str, str], str]] = []
    for chunk in _SEPARATOR.split(text):
        try:
            doc = yaml.safe_load(chunk)
        except yaml.YAMLError as exc:
            raise BookinfoError(f"{source}: not YAML: {exc}") from exc
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise BookinfoError(f"{source}: a document is not a mapping")
        meta = doc.get("metadata") or {}
        key = (
            str(doc.get("kind", "")),
            str(meta.get("namespace") or "default"),
            str(meta.get("name", "")),
        )
        out.append((key, chunk.strip("\n") + "\n"))
    return out


class ConfigLayers:
    """The layers of mesh config in ``workdir`` and the effective file the control plane reads.

    Used by the in-process :class:`Bookinfo` and by ``python -m examples.bookinfo apply`` (a
    second process talking to a running mesh), so all of its state is on disk.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.layers_dir = self.workdir / "layers"
        self.config_dir = self.workdir / "config"
        self.config_file = self.config_dir / "bookinfo.yaml"

    def names(self) -> list[str]:
        return [name for name, _ in self._layers()]

    def _layers(self) -> list[tuple[str, Path]]:
        if not self.layers_dir.is_dir():
            return []
        out = []
        for path in sorted(self.layers_dir.glob("*.yaml")):
            _, _, name = path.stem.partition("-")
            out.append((name, path))
        return out

    def effective(self, layers: Sequence[tuple[str, str]] | None = None) -> str:
        """The effective config text (later layers replace earlier definitions)."""
        if layers is None:
            layers = [(name, path.read_text()) for name, path in self._layers()]
        docs: dict[tuple[str, str, str], tuple[str, str]] = {}
        for name, text in layers:
            for key, doc in _documents(text, name):
                docs.pop(key, None)  # a replaced resource moves to its new layer's place
                docs[key] = (name, doc)
        parts = [
            "# Written by the Bookinfo launcher: the effective config of the layers in\n"
            f"# {self.layers_dir} (do not edit; use `python -m examples.bookinfo apply`).\n"
        ]
        for (kind, ns, name), (layer, doc) in docs.items():
            parts.append(f"---\n# layer {layer}: {kind} {ns}/{name}\n{doc}")
        return "".join(parts)

    def plan(
        self, add: Sequence[tuple[str, str]] = (), remove: Iterable[str] = ()
    ) -> list[tuple[str, str]]:
        """The layers after adding (or replacing, by name) ``add`` and removing ``remove``."""
        gone = set(remove) | {name for name, _ in add}
        layers = [(n, p.read_text()) for n, p in self._layers() if n not in gone]
        return layers + list(add)

    def check(self, layers: Sequence[tuple[str, str]]) -> str:
        """The effective text of ``layers``; raises :class:`BookinfoError` with the control
        plane's own validation errors (what ``pymesh analyze`` prints) if it has any."""
        from pymesh.controlplane.config import load_config

        text = self.effective(layers)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.workdir, prefix=".check-") as tmp:
            path = Path(tmp) / "bookinfo.yaml"
            path.write_text(text)
            _, issues = load_config([path])
        errors = [str(i) for i in issues if i.is_error]
        if errors:
            raise BookinfoError("the config would be rejected:\n" + "\n".join(errors))
        return text

    def commit(self, layers: Sequence[tuple[str, str]]) -> None:
        """Write ``layers`` (checked first) and the effective file (atomically)."""
        text = self.check(layers)
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        self.config_dir.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(dir=self.workdir, prefix=".layers-"))
        for i, (name, body) in enumerate(layers):
            (tmp_dir / f"{i:03d}-{name}.yaml").write_text(body)
        old = self.workdir / f".layers-old-{os.getpid()}-{time.monotonic_ns()}"
        if self.layers_dir.exists():
            os.replace(self.layers_dir, old)
        os.replace(tmp_dir, self.layers_dir)
        shutil.rmtree(old, ignore_errors=True)
        tmp = self.config_file.with_name(".bookinfo.yaml.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_file)


# -- waiting on the control plane ------------------------------------------------------------


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_pushed(admin_url: str, before: dict[str, Any], written_at: float, timeout: float) -> int:
    """Wait until the control plane has loaded the config written at ``written_at``, pushed
    it, and every connected client has ACKed what it was sent; returns the pushed version.
    Raises :class:`BookinfoError` on a reload error, a NACK, or the timeout."""
    deadline = time.monotonic() + timeout
    before_version = int((before.get("last_push") or {}).get("version", 0))
    version = None
    while time.monotonic() < deadline:
        configz = _get_json(f"{admin_url}/debug/configz")
        errors = configz.get("last_reload_errors") or []
        if errors and time.time() - written_at > 1.0:
            raise BookinfoError("the control plane rejected the config:\n" + "\n".join(errors))
        last_push = configz.get("last_push") or {}
        pushed = int(last_push.get("version", 0))
        # The push must carry the files as written: a push that was under way when they
        # were written (a registration, an earlier change) can finish after the reload.
        loaded_at = last_push.get("config_loaded_at") or 0
        if loaded_at >= written_at - 0.01 and pushed > before_version:
            version = pushed
            break
        time.sleep(0.05)
    if version is None:
        raise BookinfoError(f"the control plane did not push the new config in {timeout}s")
    while time.monotonic() < deadline:
        pending = []
        for stream in _get_json(f"{admin_url}/debug/syncz"):
            for type_name, st in (stream.get("types") or {}).items():
                nack = st.get("last_nack")
                if nack and nack.get("nonce") == st.get("nonce"):
                    raise BookinfoError(
                        f"{stream['proxy']} rejected {type_name}: {nack.get('message')}"
                    )
                if st.get("nonce") and not st.get("acked"):
                    pending.append(f"{stream['proxy']} {type_name}")
        if not pending:
            return version
        time.sleep(0.05)
    raise BookinfoError(f"not ACKed in {timeout}s: {', '.join(pending)}")


def apply_layers(
    layers: ConfigLayers,
    admin_url: str,
    add: Sequence[tuple[str, str]] = (),
    remove: Iterable[str] = (),
    timeout: float = 30.0,
    *,
    replace_all: bool = False,
) -> int:
    """Add/replace and remove layers (``replace_all``: ``add`` becomes the whole list), then
    wait for the push and the ACKs."""
    remove = list(remove)
    known = set(layers.names())
    missing = [n for n in remove if n not in known]
    if missing:
        raise BookinfoError(f"not applied: {', '.join(missing)} (applied: {', '.join(known)})")
    before = _get_json(f"{admin_url}/debug/configz")
    planned = list(add) if replace_all else layers.plan(add, remove)
    written_at = time.time()
    layers.commit(planned)
    return wait_pushed(admin_url, before, written_at, timeout)


# -- processes -------------------------------------------------------------------------------


@dataclass
class _Launch:
    argv: list[str]
    env: dict[str, str]
    log: Path


class ServiceProc:
    """One workload process (e.g. ``reviews-v2``): ``pid``, ``port``, ``start()``, ``stop()``,
    and what it served (``requests()``, ``stats()``, read from the file it writes)."""

    def __init__(
        self,
        name: str,
        *,
        app: str,
        version: str,
        port: int,
        grpc_port: int | None,
        service_account: str,
        stats_path: Path,
        launch: _Launch,
    ) -> None:
        self.name = name
        self.app = app
        self.version = version
        self.port = port
        self.grpc_port = grpc_port
        self.service_account = service_account
        self.stats_path = stats_path
        self.log_path = launch.log
        self._launch = launch
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"ServiceProc({self.name!r}, port={self.port}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProc:
        """Start the process (no-op if it runs)."""
        if self.running:
            return self
        self.stats_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._launch.argv,
                env=self._launch.env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops us in order
            )
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; waits until the process is gone."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._proc = None

    def signal_stop(self) -> None:
        """Send SIGTERM without waiting (so that several processes stop in parallel)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL at once (a crash), and reap the process."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        self._proc = None

    def stats(self) -> dict[str, Any]:
        """What the process counted: ``requests`` (total), ``paths``, ``statuses``, ``time``."""
        try:
            value = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {"requests": 0, "paths": {}, "statuses": {}}
        return value if isinstance(value, dict) else {"requests": 0, "paths": {}, "statuses": {}}

    def requests(self) -> int:
        """Requests served so far (the process writes its count before each response)."""
        return int(self.stats().get("requests", 0))


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Bookinfo:
    """Bookinfo on pymesh: control plane + CA + six workload processes.

    ``Bookinfo(workdir, mtls=True, base_port=None)``: ``workdir`` holds everything (config
    layers, the CA, tokens, certificates, bootstraps, logs); ``mtls`` applies Istio's
    ``destination-rule-all-mtls.yaml`` at start (else ``destination-rule-all.yaml``);
    ``base_port`` puts productpage on it and the others on the next ports (``None``: free
    ports). Use as a context manager, or :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        mtls: bool = True,
        base_port: int | None = None,
        cert_ttl: float = 3600.0,
        log_level: str = "INFO",
        registration_grace: float = 10.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.mtls = mtls
        self.base_port = base_port
        self.cert_ttl = cert_ttl
        self.log_level = log_level
        self.registration_grace = registration_grace
        self.layers = ConfigLayers(self.workdir)
        self.control_plane: Any = None
        self.services: dict[str, ServiceProc] = {}
        self._rate: tuple[float, int] | None = None
        self._base_layers: tuple[str, ...] = ()
        self._ca: Any = None

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Bookinfo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 90.0) -> Bookinfo:
        """Start the control plane and every workload; return once every workload is
        connected and the product page shows details and reviews."""
        from pymesh.controlplane import ControlPlane
        from pymesh.controlplane.ca import CertificateAuthority

        deadline = time.monotonic() + timeout
        for sub in ("logs", "tokens", "certs", "bootstrap", "stats"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        base = [("bookinfo", BASE_CONFIG.read_text())]
        rule = "destination-rule-all-mtls" if self.mtls else "destination-rule-all"
        base.append((rule, (NETWORKING_DIR / f"{rule}.yaml").read_text()))
        self.layers.commit(base)
        self._base_layers = tuple(name for name, _ in base)
        ca = CertificateAuthority(self.workdir / "ca")
        self._ca = ca
        self.control_plane = ControlPlane(
            [self.layers.config_dir],
            xds_address="127.0.0.1:0",
            admin_port=0,
            ca=ca,
            registration_grace=self.registration_grace,
        )
        try:
            self.control_plane.start()
            self._make_services(ca)
            for name in _START_ORDER:
                self.services[name].start()
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every workload (SIGTERM, then SIGKILL), then the control plane. Idempotent."""
        for name in reversed(_START_ORDER):
            proc = self.services.get(name)
            if proc is not None:
                proc.signal_stop()
        for name in reversed(_START_ORDER):
            proc = self.services.get(name)
            if proc is not None:
                proc.stop()
        if self.control_plane is not None:
            self.control_plane.stop()
            self.control_plane = None

    def _make_services(self, ca: Any) -> None:
        from pymesh.bootstrap import generate_bootstrap
        from pymesh.bootstrap._model import WorkloadPort

        count = len(SERVICES) + 1
        ports = (
            list(range(self.base_port, self.base_port + count))
            if self.base_port
            else _free_ports(count)
        )
        env_base = dict(os.environ)
        env_base["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env_base.get("PYTHONPATH")])]
        )
        env_base["PYTHONUNBUFFERED"] = "1"
        for i, (app, version) in enumerate(SERVICES):
            name = f"{app}-{version}"
            sa = f"bookinfo-{app}"
            port = ports[i]
            grpc_port = ports[-1] if app == "ratings" else None
            token = self.workdir / "tokens" / f"{sa}.jwt"  # new at every start (24 h)
            fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(ca.create_token("default", sa))
            cert_dir = self.workdir / "certs" / name
            wports = [WorkloadPort(port, "http", "TCP")]
            if grpc_port:
                wports.append(WorkloadPort(grpc_port, "grpc", "TCP"))
            data = generate_bootstrap(
                xds_address=self.control_plane.address,
                namespace="default",
                service_account=sa,
                workload=name,
                labels={"app": app, "version": version},
                ip="127.0.0.1",
                ports=wports,
                cert_dir=str(cert_dir),
                group=name,
            )
            providers: Any = data.get("certificate_providers")
            providers["default"]["config"]["refresh_interval"] = "5s"
            bootstrap = self.workdir / "bootstrap" / f"{name}.json"
            bootstrap.write_text(json.dumps(data, indent=2))
            stats = self.workdir / "stats" / f"{name}.json"
            argv = [
                sys.executable,
                "-m",
                "examples.bookinfo.services",
                name,
                "--port",
                str(port),
                "--ca-address",
                self.control_plane.address,
                "--token",
                str(token),
                "--cert-dir",
                str(cert_dir),
                "--service-account",
                sa,
                "--stats",
                str(stats),
                "--cert-ttl",
                str(self.cert_ttl),
                "--parent-pid",
                str(os.getpid()),
                "--log-level",
                self.log_level,
            ]
            if grpc_port:
                argv += ["--grpc-port", str(grpc_port)]
            env = dict(env_base, GRPC_XDS_BOOTSTRAP=str(bootstrap), HOSTNAME=name)
            launch = _Launch(argv, env, self.workdir / "logs" / f"{name}.log")
            self.services[name] = ServiceProc(
                name,
                app=app,
                version=version,
                port=port,
                grpc_port=grpc_port,
                service_account=sa,
                stats_path=stats,
                launch=launch,
            )

    def ensure_running(self, timeout: float = 60.0) -> list[str]:
        """Start every workload process that is not running (a test stopped or killed it)
        and wait until all are connected and the product page works again; returns the
        names restarted."""
        restarted = [name for name in _START_ORDER if not self.services[name].running]
        for name in restarted:
            self.services[name].start()
        if restarted:
            self._wait_ready(time.monotonic() + timeout)
        return restarted

    def _wait_ready(self, deadline: float) -> None:
        import httpx

        last = "nothing yet"
        while time.monotonic() < deadline:
            dead = [p.name for p in self.services.values() if not p.running]
            if dead:
                raise BookinfoError(
                    f"{', '.join(dead)} exited during start; see {self.workdir / 'logs'}"
                )
            connected = self.connected_workloads()
            missing = sorted(set(self.services) - connected)
            if missing:
                last = f"not connected: {', '.join(missing)}"
                time.sleep(0.2)
                continue
            try:
                r = httpx.get(self.page_url, timeout=10)
                if r.status_code == 200 and "Book Details" in r.text and "Book Reviews" in r.text:
                    return
                last = f"product page: {r.status_code}"
            except httpx.HTTPError as exc:
                last = f"product page: {exc!r}"
            time.sleep(0.2)
        raise BookinfoError(f"Bookinfo not ready in time ({last}); logs in {self.workdir / 'logs'}")

    # -- addresses ---------------------------------------------------------------------------

    @property
    def productpage_url(self) -> str:
        """The product page service's base URL, ``http://127.0.0.1:PORT`` (the page is
        ``productpage_url + "/productpage"``, see :attr:`page_url`)."""
        return self.services["productpage-v1"].url

    @property
    def page_url(self) -> str:
        return f"{self.productpage_url}/productpage"

    @property
    def admin_url(self) -> str:
        if self.control_plane is None:
            raise BookinfoError("not started")
        return str(self.control_plane.admin_url)

    @property
    def xds_address(self) -> str:
        if self.control_plane is None:
            raise BookinfoError("not started")
        return str(self.control_plane.address)

    # -- config ------------------------------------------------------------------------------

    def apply(self, *names_or_paths: str | Path, timeout: float = 30.0) -> int:
        """Apply scenarios (Istio networking sample names like ``reviews-50-v3``, or YAML
        files) in order, as one change; returns once pushed and ACKed (the config version)."""
        add = []
        for item in names_or_paths:
            name, path = resolve_scenario(item)
            add.append((name, path.read_text()))
        return apply_layers(self.layers, self.admin_url, add, (), timeout)

    def apply_yaml(self, text: str, *, name: str, timeout: float = 30.0) -> int:
        """Apply raw YAML as the layer ``name`` (replacing a layer of that name)."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise BookinfoError(f"bad layer name {name!r}")
        return apply_layers(self.layers, self.admin_url, [(name, text)], (), timeout)

    def remove(self, *names: str, timeout: float = 30.0, missing_ok: bool = True) -> int | None:
        """Remove applied layers (by the name :meth:`apply` used: ``reviews-50-v3`` is the
        layer ``virtual-service-reviews-50-v3``; either form works). Names not applied are
        skipped (``missing_ok=False``: an error); ``None`` when nothing was removed."""
        known = set(self.layers.names())
        resolved = []
        for name in names:
            stem = Path(str(name)).stem if str(name).endswith((".yaml", ".yml")) else str(name)
            for candidate in (stem, f"virtual-service-{stem}", f"destination-rule-{stem}"):
                if candidate in known:
                    resolved.append(candidate)
                    break
            else:
                if not missing_ok:
                    raise BookinfoError(f"not applied: {name} (applied: {', '.join(known)})")
        if not resolved:
            return None
        return apply_layers(self.layers, self.admin_url, (), resolved, timeout)

    def reset(self, timeout: float = 30.0) -> int | None:
        """Remove every layer applied after start (back to the start config); ``None`` if
        there was nothing to remove, else the pushed config version."""
        extra = [n for n in self.layers.names() if n not in self._base_layers]
        if not extra:
            return None
        return apply_layers(self.layers, self.admin_url, (), extra, timeout)

    def snapshot(self) -> list[tuple[str, str]]:
        """The config layers in force, ``(name, YAML text)`` oldest first (see
        :meth:`restore`)."""
        return [(name, path.read_text()) for name, path in self.layers._layers()]

    def restore(self, snapshot: Sequence[tuple[str, str]], timeout: float = 30.0) -> int | None:
        """Put back the layers of a :meth:`snapshot`; ``None`` if nothing changed since."""
        if self.snapshot() == list(snapshot):
            return None
        return apply_layers(
            self.layers, self.admin_url, list(snapshot), (), timeout, replace_all=True
        )

    def applied(self) -> list[str]:
        """Names of the config layers in force, oldest first."""
        return self.layers.names()

    # -- clients inside the mesh -------------------------------------------------------------

    def mesh_user(
        self,
        name: str | None = None,
        *,
        service_account: str = "bookinfo-gateway",
        namespace: str = "default",
        timeout: float = 30.0,
    ) -> Any:
        """A :class:`~examples.bookinfo.client.User` that reaches productpage *through the
        mesh*, as Istio's ingress gateway does: a :mod:`pymesh.httpx` client with its own
        SPIFFE identity (``service_account``, certificate from the CA) calling
        ``http://productpage:9080`` (mTLS per the DestinationRule, so it works under STRICT).
        Logged in as ``name`` when given. Close it when done."""
        from examples.bookinfo.client import User
        from examples.bookinfo.services._common import IdentityAgent
        from pymesh.bootstrap import generate_bootstrap, parse_bootstrap
        from pymesh.httpx import Client
        from pymesh.security import SpiffeId
        from pymesh.xds.client import XdsClient

        if self.control_plane is None or self._ca is None:
            raise BookinfoError("not started")
        tag = f"{namespace}-{service_account}-{time.monotonic_ns()}"
        token = self.workdir / "tokens" / f"{tag}.jwt"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._ca.create_token(namespace, service_account))
        cert_dir = self.workdir / "certs" / tag
        agent = IdentityAgent(
            self.xds_address,
            SpiffeId("cluster.local", namespace, service_account),
            token,
            cert_dir,
            self.cert_ttl,
        )
        agent.start()
        data = generate_bootstrap(
            xds_address=self.xds_address,
            namespace=namespace,
            service_account=service_account,
            workload=service_account,
            cert_dir=str(cert_dir),
        )
        xds = XdsClient(parse_bootstrap(json.dumps(data), source=tag))
        client = Client(
            xds_client=xds, mesh_wait=10.0, base_url="http://productpage:9080", timeout=timeout
        )
        user = User("http://productpage:9080", client=client)
        user._owned += [xds, agent]
        if name:
            user.login(name)
        return user

    # -- status ------------------------------------------------------------------------------

    def connected_workloads(self) -> set[str]:
        """Names (``reviews-v2``) of the workloads registered and connected right now."""
        configz = _get_json(f"{self.admin_url}/debug/configz")
        out = set()
        for w in configz.get("workloads") or ():
            labels = w.get("labels") or {}
            if w.get("connected") and labels.get("app") and labels.get("version"):
                out.add(f"{labels['app']}-{labels['version']}")
        return out

    def status(self) -> dict[str, Any]:
        """``{"workloads": {name: {...}}, "connected": n, "requests": n,
        "requests_per_second": x, "config_version": v, "applied": [...]}``; requests are
        productpage's (the application's front door), the rate since the previous call."""
        connected = self.connected_workloads()
        workloads: dict[str, dict[str, Any]] = {}
        for name, proc in self.services.items():
            workloads[name] = {
                "pid": proc.pid,
                "port": proc.port,
                "running": proc.running,
                "connected": name in connected,
                "requests": proc.requests(),
            }
        now = time.monotonic()
        total = int(workloads["productpage-v1"]["requests"]) if workloads else 0
        rate = 0.0
        if self._rate is not None and now > self._rate[0]:
            rate = max(0, total - self._rate[1]) / (now - self._rate[0])
        self._rate = (now, total)
        configz = _get_json(f"{self.admin_url}/debug/configz")
        return {
            "workloads": workloads,
            "connected": len(connected & set(self.services)),
            "requests": total,
            "requests_per_second": round(rate, 2),
            "config_version": configz.get("version"),
            "applied": self.applied(),
        }
