"""One ADS call over grpcio: bytes in, bytes out, events reported through callbacks.

The transport knows no protos: requests arrive already serialized by the codec and
responses leave as bytes (generic ``stream_stream`` with identity (de)serializers), so a
response that does not parse is the client's problem to NACK or log, not a torn-down call.

Life of an :class:`AdsStream`: ``start`` creates a channel and watches its connectivity;
the first READY opens the bidi call and reports ``on_connected``; a TRANSIENT_FAILURE
before READY reports ``on_closed`` (the server cannot be reached). Every response is
reported with ``on_response`` from a reader thread, and the end of the call, whatever its
cause, with one ``on_closed(error)``. ``close`` cancels the call and joins the reader; it
reports nothing. Callbacks run on grpcio's or the reader thread: the client posts them to
its work serializer.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from pymesh.bootstrap import XdsServer
from pymesh.xds.transport.channel import close_channel, create_channel

__all__ = ["DELTA_METHOD", "SOTW_METHOD", "AdsStream", "ChannelProbe"]

log = logging.getLogger(__name__)

_SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
SOTW_METHOD = _SERVICE + "StreamAggregatedResources"
DELTA_METHOD = _SERVICE + "DeltaAggregatedResources"

_JOIN_TIMEOUT = 5.0
_END = object()


def _identity(data: bytes) -> bytes:
    return data


class AdsStream:
    """One ADS stream to one server (see the module docstring)."""

    def __init__(
        self,
        server: XdsServer,
        *,
        delta: bool,
        on_connected: Callable[[], None],
        on_response: Callable[[bytes], None],
        on_closed: Callable[[str], None],
    ) -> None:
        self.server = server
        self.delta = delta
        self._on_connected = on_connected
        self._on_response = on_response
        self._on_closed = on_closed
        self._lock = threading.Lock()
        self._closed = False
        self._opened = False
        self._reported_closed = False
        self._channel: grpc.Channel | None = None
        self._call: Any = None  # grpc's call iterator (cancel(), iteration)
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Begin connecting; events follow through the callbacks."""
        try:
            channel = create_channel(self.server)
        except Exception as exc:
            self._report_closed(f"cannot create channel: {exc}")
            return
        with self._lock:
            if self._closed:
                close_channel(channel)
                return
            self._channel = channel
        channel.subscribe(self._on_state, try_to_connect=True)

    def send(self, data: bytes) -> None:
        """Queue one serialized request (dropped once closed)."""
        if not self._closed:
            self._requests.put(data)

    def close(self) -> None:
        """Cancel the call, close the channel, join the reader. Reports nothing more."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            channel, call, reader = self._channel, self._call, self._reader
        self._requests.put(_END)
        if channel is not None:
            channel.unsubscribe(self._on_state)
        if call is not None:
            call.cancel()
        if reader is not None and reader is not threading.current_thread():
            reader.join(_JOIN_TIMEOUT)
        if channel is not None:
            close_channel(channel)

    # -- internals -------------------------------------------------------------------------

    def _report_closed(self, error: str) -> None:
        with self._lock:
            if self._closed or self._reported_closed:
                return
            self._reported_closed = True
        try:
            self._on_closed(error)
        except Exception:
            log.exception("xDS stream close callback failed")

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            self._open()
        elif state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            with self._lock:
                if self._opened:
                    return
                self._opened = True  # no call will be made on this channel
            self._stop_watching()
            self._report_closed(f"cannot connect to xDS server {self.server.uri}")
            # Close the channel here, on grpcio's delivery thread: waiting for its poller
            # must not hold up the client's work serializer (which starts the next attempt).
            with self._lock:
                channel, self._channel = self._channel, None
            if channel is not None:
                close_channel(channel)

    def _stop_watching(self) -> None:
        channel = self._channel
        if channel is not None:
            try:
                channel.unsubscribe(self._on_state)
            except ValueError:
                pass

    def _request_iterator(self) -> Iterator[bytes]:
        while True:
            item = self._requests.get()
            if item is _END or self._closed:
                return
            assert isinstance(item, bytes)
            yield item

    def _open(self) -> None:
        with self._lock:
            if self._closed or self._opened or self._channel is None:
                return
            self._opened = True
            method = DELTA_METHOD if self.delta else SOTW_METHOD
            try:
                multicallable = self._channel.stream_stream(
                    method,
                    request_serializer=_identity,
                    response_deserializer=_identity,
                )
                self._call = multicallable(self._request_iterator())
            except Exception as exc:  # e.g. the channel went away under us
                failure: str | None = f"cannot start the ADS call: {exc!r}"
            else:
                failure = None
                self._reader = threading.Thread(
                    target=self._read, name=f"pymesh-xds-reader {self.server.uri}", daemon=True
                )
                self._reader.start()
        self._stop_watching()
        if failure is not None:
            self._report_closed(failure)
            return
        try:
            self._on_connected()
        except Exception:
            log.exception("xDS stream connect callback failed")

    def _read(self) -> None:
        call = self._call
        assert call is not None
        error = "stream closed by the server"
        try:
            for response in call:
                if self._closed:
                    return
                self._on_response(response)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            error = f"{getattr(code, 'name', code)}: {details}"
        except Exception as exc:
            log.exception("xDS stream reader failed")
            error = f"stream failed: {exc!r}"
        self._requests.put(_END)
        self._report_closed(error)


class ChannelProbe:
    """Is a server reachable? Reports ``on_result(True)`` at READY, ``False`` at failure."""

    def __init__(self, server: XdsServer, on_result: Callable[[bool], None]) -> None:
        self.server = server
        self._on_result = on_result
        self._lock = threading.Lock()
        self._done = False
        self._channel: grpc.Channel | None = None

    def start(self) -> None:
        try:
            channel = create_channel(self.server)
        except Exception:
            self._finish(False)
            return
        with self._lock:
            if self._done:
                close_channel(channel)
                return
            self._channel = channel
        channel.subscribe(self._on_state, try_to_connect=True)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            self._finish(True)
        elif state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            self._finish(False)

    def _finish(self, ok: bool) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self.close()
        try:
            self._on_result(ok)
        except Exception:
            log.exception("xDS probe callback failed")

    def close(self) -> None:
        with self._lock:
            self._done = True
            channel, self._channel = self._channel, None
        if channel is not None:
            try:
                channel.unsubscribe(self._on_state)
            except ValueError:
                pass
            close_channel(channel)
