"""Telemetry from environment variables (what a deployment sets, like Istio's mesh config).

=================================  ==========================================  ============
variable                           meaning                                     default
=================================  ==========================================  ============
``PYMESH_TELEMETRY``               ``on`` / ``off``                            ``off``
``PYMESH_PROMETHEUS_ADDRESS``      ``HOST:PORT`` of the scrape endpoint,       ``127.0.0.1:15020``
                                   ``off`` for none
``PYMESH_PROMETHEUS_PATH``         scrape path                                 ``/stats/prometheus``
``PYMESH_ACCESS_LOG``              ``off`` / ``sampled`` / ``full``            ``off``
``PYMESH_ACCESS_LOG_FORMAT``       ``text`` / ``json``                         ``text``
``PYMESH_ACCESS_LOG_SAMPLE``       fraction logged in ``sampled`` mode         ``0.01``
``PYMESH_ACCESS_LOG_FILE``         where lines go (Istio's ``accessLogFile``:  the ``pymesh.access``
                                   a path, ``/dev/stdout``)                    logger
``PYMESH_TRACE_SAMPLING``          percent of new traces sampled               ``1.0``
``PYMESH_TRACE_PROPAGATION``       comma list (tracecontext, b3multi, b3)      W3C and b3
``PYMESH_PEER_EXCHANGE``           Istio's metadata exchange ``on`` / ``off``  ``on``
=================================  ==========================================  ============
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pymesh.errors import ConfigError
from pymesh.telemetry._accesslog import LogFileError

if TYPE_CHECKING:
    from pymesh.bootstrap import Node
    from pymesh.telemetry._telemetry import Telemetry

__all__ = ["configure_from_env"]


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(
            f"{name} must be a number, not {raw!r}", source="environment", field=name
        ) from None


def configure_from_env(
    node: Node | None = None, env: Mapping[str, str] | None = None
) -> Telemetry | None:
    """Build, install and return the process telemetry as the environment says (``None``
    when ``PYMESH_TELEMETRY`` is not ``on``). Starts the scrape endpoint unless ``off``.
    Without ``node``, the workload is named by the gRPC xDS bootstrap of the environment
    (``GRPC_XDS_BOOTSTRAP`` / ``GRPC_XDS_BOOTSTRAP_CONFIG``), if any."""
    from pymesh.telemetry._telemetry import Telemetry, install

    env = os.environ if env is None else env
    if env.get("PYMESH_TELEMETRY", "off").lower() not in ("on", "1", "true"):
        return None
    options: dict[str, Any] = {}
    for name, key, allowed in (
        ("PYMESH_ACCESS_LOG", "access_log", ("off", "sampled", "full")),
        ("PYMESH_ACCESS_LOG_FORMAT", "access_log_format", ("text", "json")),
    ):
        value = env.get(name)
        if value:
            if value not in allowed:
                raise ConfigError(
                    f"{name} must be one of {', '.join(allowed)}, not {value!r}",
                    source="environment",
                    field=name,
                )
            options[key] = value
    options["access_log_sample"] = _float(env, "PYMESH_ACCESS_LOG_SAMPLE", 0.01)
    log_file = env.get("PYMESH_ACCESS_LOG_FILE")
    if log_file:
        options["access_log_file"] = log_file
    options["trace_sampling"] = _float(env, "PYMESH_TRACE_SAMPLING", 1.0)
    exchange = env.get("PYMESH_PEER_EXCHANGE", "on").strip().lower()
    if exchange not in ("on", "off", "1", "0", "true", "false"):
        raise ConfigError(
            f"PYMESH_PEER_EXCHANGE must be on or off, not {exchange!r}",
            source="environment",
            field="PYMESH_PEER_EXCHANGE",
        )
    options["peer_exchange"] = exchange in ("on", "1", "true")
    propagation = env.get("PYMESH_TRACE_PROPAGATION")
    if propagation:
        options["propagation"] = tuple(p.strip() for p in propagation.split(",") if p.strip())
    if node is None and (env.get("GRPC_XDS_BOOTSTRAP") or env.get("GRPC_XDS_BOOTSTRAP_CONFIG")):
        from pymesh.bootstrap import load_bootstrap

        node = load_bootstrap(env).node  # the workload's own names, as its xDS client reads
    try:
        tel = Telemetry(node=node, **options)
    except LogFileError as exc:
        raise ConfigError(str(exc), source="environment", field="PYMESH_ACCESS_LOG_FILE") from None
    except ValueError as exc:
        raise ConfigError(str(exc), source="environment") from None
    address = env.get("PYMESH_PROMETHEUS_ADDRESS", "127.0.0.1:15020")
    if address.lower() != "off":
        host, _, port = address.rpartition(":")
        try:
            port_number = int(port)
        except ValueError:
            raise ConfigError(
                f"PYMESH_PROMETHEUS_ADDRESS must be HOST:PORT, not {address!r}",
                source="environment",
                field="PYMESH_PROMETHEUS_ADDRESS",
            ) from None
        tel.serve_prometheus(
            host=host.strip("[]") or "127.0.0.1",
            port=port_number,
            path=env.get("PYMESH_PROMETHEUS_PATH", "/stats/prometheus"),
        )
    return install(tel)
