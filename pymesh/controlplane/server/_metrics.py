"""Control-plane counters, rendered in the Prometheus text format (names after istiod's)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

__all__ = ["Metrics"]

_HELP = {
    "pilot_xds_pushes": ("counter", "xDS responses sent, by type"),
    "pilot_xds_push_errors": ("counter", "Failures while generating or sending a push"),
    "pilot_total_xds_rejects": ("counter", "NACKs received from clients, by type"),
    "pilot_xds_acks": ("counter", "ACKs received from clients, by type"),
    "pilot_xds_requests_unknown_type": ("counter", "Requests for a type URL we do not serve"),
    "pilot_xds_full_pushes": ("counter", "Full pushes to all connected clients"),
    "pilot_xds_push_seconds_sum": ("counter", "Total seconds spent computing full pushes"),
    "pilot_xds_config_reloads": ("counter", "Config reloads, by result (ok or error)"),
    "pilot_total_config_errors": ("counter", "Config files rejected with errors"),
    "pilot_xds_connections_total": ("counter", "ADS streams opened"),
    "pilot_debounce_merged_events": ("counter", "Config events merged by debouncing"),
    "pymesh_autoregistered_workloads": ("gauge", "Auto-registered workload entries"),
    "pilot_xds": ("gauge", "Connected ADS clients"),
    "pymesh_config_version": ("gauge", "Current config version"),
    "pymesh_ready": ("gauge", "1 once a good config is loaded"),
}


class Metrics:
    """Labelled counters plus gauges read at render time. Not thread-safe: owned by the loop."""

    def __init__(self) -> None:
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(
            lambda: defaultdict(float)
        )
        self._gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self._values[name][tuple(sorted(labels.items()))] += amount

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self._gauges[name] = read

    def value(self, name: str, **labels: str) -> float:
        return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def total(self, name: str) -> float:
        return sum(self._values.get(name, {}).values())

    def render(self) -> str:
        lines: list[str] = []
        names = sorted(set(self._values) | set(self._gauges) | set(_HELP))
        for name in names:
            kind, text = _HELP.get(name, ("untyped", name))
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            if name in self._gauges:
                lines.append(f"{name} {_fmt(self._gauges[name]())}")
                continue
            series = self._values.get(name) or {(): 0.0}
            for labels, value in sorted(series.items()):
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                head = f"{name}{{{rendered}}}" if rendered else name
                lines.append(f"{head} {_fmt(value)}")
        return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
