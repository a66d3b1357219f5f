"""The metrics HTTP endpoint: ``/metrics`` in Prometheus' text or OpenMetrics format."""

from __future__ import annotations

import errno
import gzip
import logging
import socket
import threading
import time
from collections.abc import Iterable
from socketserver import TCPServer, ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client import generate_latest
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from blockd.monitoring import device_families as device_metrics
from blockd.monitoring.collector import BlockdCollector, ScrapeError, make_registry

__all__ = ["DEFAULT_METRICS_PORT", "MAX_CONNECTIONS", "REQUEST_TIMEOUT", "MetricsServer"]

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9580
GZIP_LEVEL = 1
"""Fastest; still about 20 times smaller for this text (level 9 costs several times more)."""


_INDEX = (
    b"<!DOCTYPE html>\n<html><head><title>blockd</title></head><body>"
    b'<h1>blockd</h1><p><a href="/metrics">Metrics</a></p></body></html>\n'
)


MAX_CONNECTIONS = 16
"""Connections served at once; more are closed at once (and counted in ``refused``)."""
REQUEST_TIMEOUT = 10.0
"""Seconds a connection may take to send its request or read the reply."""
_ACCEPT_BACKOFF = 0.1  # seconds to wait when accept fails for want of descriptors


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most :data:`MAX_CONNECTIONS`, each with a timeout.

    Without the cap and the timeout every idle connection held a thread and a
    descriptor for ever: a local user could exhaust the daemon's descriptors
    and lock NBD and QMP clients out.  Threads do not outlive the daemon.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # the listen backlog (socketserver's 5 drops SYNs under load)

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0
        super().__init__(address, _QuietHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # No descriptor for the connection: it stays queued and the socket
                # stays readable; wait instead of spinning on accept.
                time.sleep(_ACCEPT_BACKOFF)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (getfqdn): a DNS query
        # at start-up for nothing.  Bind, and take the address as it is.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (Prometheus scrapes every few seconds); a socket timeout."""

    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """``/metrics`` over HTTP, served from a thread of its own.

    Content negotiation follows prometheus_client (text format 0.0.4 by
    default, OpenMetrics when the ``Accept`` header asks for it; gzip when
    ``Accept-Encoding`` allows it).  The daemon's registry gives the daemon
    and ``process_*`` families; the per-device families, nearly all of a large
    scrape, are written directly by :mod:`blockd.monitoring.device_families` from the same
    sample.  ``/`` shows a link to ``/metrics``; every other path is 404.
    """

    def __init__(self, collector: BlockdCollector, max_connections: int = MAX_CONNECTIONS
                 ) -> None:
        self.collector = collector
        self.max_connections = max_connections  # served at once; more are closed at once
        self.registry = make_registry(collector)
        self._writer = device_metrics.TextWriter()
        self._writer_lock = threading.Lock()  # scrapes may overlap (a thread each)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> None:
        """Bind ``host``:``port`` (0: any free port) and serve; raise OSError if binding fails."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        server = _Server((str(sockaddr[0]), port), family, self.max_connections)
        server.set_app(self._app)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="blockd-metrics",
                                        daemon=True)
        self._thread.start()

    @property
    def refused(self) -> int:
        """Connections closed at once because MAX_CONNECTIONS were being served."""
        return self._server.refused if self._server is not None else 0

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port."""
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics`` with the port actually bound."""
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/metrics"

    def close(self) -> None:
        """Stop serving and close the socket (blocks up to half a second: call it off the loop)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _metrics(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"),
                                                      ("Content-Type", "text/plain")])
            return [f"blockd: {method} is not allowed; use GET\n".encode()]
        _, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        openmetrics = content_type.startswith("application/openmetrics-text")
        sample = self.collector.take_sample()
        with self.collector.serving(sample):
            head = (openmetrics_latest if openmetrics else generate_latest)(self.registry)
        with self._writer_lock:
            devices = self._writer.write(sample.devices, openmetrics=openmetrics).encode()
        if openmetrics:
            body = b"".join([head.removesuffix(b"# EOF\n"), devices, b"# EOF\n"])
        else:
            body = head + devices
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [b""] if method == "HEAD" else [body]

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            try:
                return self._metrics(environ, start_response)
            except ScrapeError as err:
                return _plain(start_response, "503 Service Unavailable", f"blockd: {err}\n")
            except Exception:
                log.exception("metrics: scrape failed")
                return _plain(start_response, "500 Internal Server Error",
                              "blockd: the scrape failed (see the daemon's log)\n")
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [_INDEX]
        return _plain(start_response, "404 Not Found", "Not Found: try /metrics\n")


def _plain(start_response: StartResponse, status: str, text: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [text.encode()]
