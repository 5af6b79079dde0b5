"""Telemetry in Istio's vocabulary: metrics, traces and access logs (DESIGN.md decision 8).

The only pymesh module that imports OpenTelemetry. One :class:`Telemetry` per process::

    import pymesh.telemetry as telemetry

    tel = telemetry.install(telemetry.Telemetry(node=bootstrap.node, access_log="full"))
    tel.serve_prometheus()            # :15020/stats/prometheus on loopback

or from the environment with :func:`configure_from_env`. The httpx and gRPC adapters report
every request to the installed telemetry; ASGI apps are wrapped with
:func:`asgi_middleware`; any other server calls :meth:`Telemetry.server_call` at the start
of a request and :meth:`ServerCall.finish` at its end (see ``docs/metrics.md``).
"""

from __future__ import annotations

from pymesh.telemetry._accesslog import AccessRecord, format_json, format_text
from pymesh.telemetry._asgi import asgi_middleware
from pymesh.telemetry._env import configure_from_env
from pymesh.telemetry._labels import LABEL_NAMES, UNKNOWN
from pymesh.telemetry._metrics import BYTES_BUCKETS, DURATION_BUCKETS, render_prometheus
from pymesh.telemetry._propagation import extract, inject
from pymesh.telemetry._server import PrometheusServer
from pymesh.telemetry._telemetry import (
    AccessLogMode,
    ClientCall,
    ServerCall,
    Telemetry,
    current,
    install,
    uninstall,
)

__all__ = [
    "BYTES_BUCKETS",
    "DURATION_BUCKETS",
    "LABEL_NAMES",
    "UNKNOWN",
    "AccessLogMode",
    "AccessRecord",
    "ClientCall",
    "PrometheusServer",
    "ServerCall",
    "Telemetry",
    "asgi_middleware",
    "configure_from_env",
    "current",
    "extract",
    "format_json",
    "format_text",
    "inject",
    "install",
    "render_prometheus",
    "uninstall",
]
