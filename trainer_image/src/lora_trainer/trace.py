"""trace.jsonl: one record per logged step (documented in docs/trace-schema.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TextIO

SCHEMA_VERSION = 1


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so a reader sees them, not a parse error."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class TraceWriter:
    """Appends records (resume keeps the earlier ones); flushes each so readers see it live."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_clean({"schema": SCHEMA_VERSION, **record})) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_trace(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
