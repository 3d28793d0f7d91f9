"""The operator's HTTP endpoints: /metrics, /healthz (liveness), /readyz (readiness).

A tiny stdlib server on a daemon thread, next to kopf's event loop: scrapes and probes never
wait for a reconcile, and the callbacks it is given must be cheap and non-blocking.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from lora_operator.api.http import TEXT_PLAIN, QuietHandler
from lora_operator.controller.metrics import OperatorMetrics

# How often the serving thread checks for stop(): bounds how long a shutdown waits.
POLL_INTERVAL_S: float = 0.05


def serve(
    host: str,
    port: int,
    metrics: OperatorMetrics,
    ready: Callable[[], bool],
    live: Callable[[], bool],
) -> ThreadingHTTPServer:
    """Serve GET /metrics, /healthz (200 while live()) and /readyz (200 once ready()).

    Port 0 picks a free port (read it from `server.server_address`). Stop with `stop()`.
    """

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, metrics.render())
            elif path == "/healthz":
                self._probe(live)
            elif path == "/readyz":
                self._probe(ready)
            else:
                self._send(404, TEXT_PLAIN, b"not found\n")

        def _probe(self, check: Callable[[], bool]) -> None:
            try:
                ok = bool(check())
            except Exception:  # a failing check is a failed probe, not a dropped connection
                ok = False
            if ok:
                self._send(200, TEXT_PLAIN, b"ok\n")
            else:
                self._send(503, TEXT_PLAIN, b"not ok\n")

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": POLL_INTERVAL_S},
        name="operator-http",
        daemon=True,
    ).start()
    return server


def stop(server: ThreadingHTTPServer) -> None:
    """Stop serving and close the listening socket."""
    server.shutdown()
    server.server_close()
