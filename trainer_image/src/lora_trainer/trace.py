"""trace.jsonl: one record per logged step (documented in docs/trace-schema.md)."""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def json_safe(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so a reader sees them, not a parse error."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class TraceWriter:
    """Appends records (resume keeps the earlier ones); flushes each so readers see it live.

    Records are serialised and written by a background thread, in order, so the training
    loop never waits for JSON encoding or the disk. A record may carry `late` fields: a
    function the thread calls just before writing (the step's telemetry, which may still be
    on its way from the GPU). `observers` see every record as written (e.g. health rules).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = path.open("a", encoding="utf-8")
        self.observers: list[Callable[[dict[str, Any]], None]] = []
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)
        self._thread.start()

    def write(
        self, record: dict[str, Any], late: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        self._queue.put((record, late))

    def drain(self) -> None:
        """Wait until every record written so far is on disk."""
        self._queue.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._file.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception:  # the trace must never stop training
                log.exception("trace: cannot write a record")
            finally:
                self._queue.task_done()

    def _write(self, record: dict[str, Any], late: Callable[[], dict[str, Any]] | None) -> None:
        full = {"schema": SCHEMA_VERSION, **record, **(late() if late is not None else {})}
        self._file.write(json.dumps(json_safe(full)) + "\n")
        self._file.flush()
        for observer in self.observers:
            observer(full)


_Item = tuple[dict[str, Any], Callable[[], dict[str, Any]] | None]


def read_trace(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
