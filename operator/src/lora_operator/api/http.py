"""The request handler base of the small stdlib HTTP servers (operator and trainer /metrics).

Stdlib only, so the trainer may import it: no kopf, no Kubernetes client.
"""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler
from typing import Any

TEXT_PLAIN: str = "text/plain; charset=utf-8"


class QuietHandler(BaseHTTPRequestHandler):
    """A handler that answers with whole bodies and logs nothing per request."""

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return  # probes and scrapes every few seconds would flood the log
