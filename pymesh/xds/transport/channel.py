"""gRPC channels to xDS servers, built from the bootstrap's :class:`XdsServer`."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from pymesh.bootstrap import XdsServer
from pymesh.errors import XdsError

__all__ = ["CHANNEL_OPTIONS", "close_channel", "create_channel"]

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # xDS responses (EDS of large services) exceed gRPC's 4 MiB default.
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    # One fresh subchannel per attempt: our own backoff decides when to retry.
    ("grpc.use_local_subchannel_pool", 1),
    # Notice a control plane that vanished without closing the connection (a partition):
    # a ping every 5 minutes is well within what istiod and grpc servers permit.
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)


def _read(path: str | None, what: str, server: XdsServer) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise XdsError(f"xDS server {server.uri}: cannot read {what} {path}: {exc}") from exc


def create_channel(server: XdsServer) -> grpc.Channel:
    """A channel to ``server.uri`` (``host:port``, ``dns:///``, ``unix:`` targets...).

    ``insecure`` credentials give a plaintext channel; ``tls`` and ``google_default`` a TLS
    channel with the configured CA (else the system roots) and, if configured, a client
    certificate. Raises :class:`XdsError` if a credentials file cannot be read.
    """
    creds = server.channel_credentials
    if creds.type == "insecure":
        return grpc.insecure_channel(server.uri, options=CHANNEL_OPTIONS)
    tls = creds.tls
    root = key = chain = None
    if tls is not None:
        root = _read(tls.ca_certificate_file, "CA certificate", server)
        key = _read(tls.private_key_file, "private key", server)
        chain = _read(tls.certificate_file, "certificate", server)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=chain
    )
    return grpc.secure_channel(server.uri, credentials, options=CHANNEL_OPTIONS)


_POLL_STOP_TIMEOUT = 1.0


def close_channel(channel: grpc.Channel) -> None:
    """Close ``channel`` once grpcio's connectivity-polling thread has stopped.

    grpcio polls connectivity on a thread that re-arms a 0.2 s watch while callbacks were
    subscribed when it last looked; closing the channel under it makes that thread die with
    "Cannot monitor channel state: Channel closed!". Callers unsubscribe first; this waits
    (at most a second) for the poller to notice, then closes. The attribute is private to
    grpcio, hence the defensive ``getattr``: without it we simply close.
    """
    state = getattr(channel, "_connectivity_state", None)
    deadline = time.monotonic() + _POLL_STOP_TIMEOUT
    while getattr(state, "polling", False) and time.monotonic() < deadline:
        time.sleep(0.005)
    channel.close()
