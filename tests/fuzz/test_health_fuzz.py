"""The operator's `/health` reader and parser, and the trace replay CLI, on malformed input.

read_health is pointed at a tiny local http.server that answers what the test tells it:
wrong status, wrong content, huge, slow, truncated, non-JSON, JSON arrays, NaN, nested
garbage. It must never raise and must classify every answer (a body, or an error kind).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_operator.api import constants as c
from lora_operator.cli import main
from lora_operator.controller.health_watch import ERROR_KINDS, Probe, assess, parse_body
from lora_operator.controller.kube import HEALTH_BODY_LIMIT, read_health
from lora_operator.validation import validate_body
from tests.fuzz.strategies import EXAMPLE_BODIES, deep, fuzz_settings, json_values
from tests.health.streams import trace

NOW = "2026-01-01T00:10:00Z"
SPEC = validate_body(EXAMPLE_BODIES[0]).resource.spec  # type: ignore[union-attr]


# --- a /health server that answers what the test says --------------------------------------


class _Answer:
    status = 200
    headers: dict[str, str] = {}  # noqa: RUF012
    body = b"{}"
    delay = 0.0
    length: int | None = None  # Content-Length to claim (None: the real one)


ANSWER = _Answer()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        a = ANSWER
        if a.delay:
            time.sleep(a.delay)
        try:
            self.send_response(a.status)
            for key, value in a.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(a.body) if a.length is None else a.length))
            self.end_headers()
            self.wfile.write(a.body)
        except OSError:
            pass  # the client gave up (timeout): nothing to do

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _serve(status: int = 200, body: bytes = b"{}", delay: float = 0.0, **kw: Any) -> None:
    ANSWER.status, ANSWER.body, ANSWER.delay = status, body, delay
    ANSWER.length = kw.get("length")
    ANSWER.headers = kw.get("headers", {"Content-Type": "application/json"})


def _classified(probe: Probe) -> None:
    assert isinstance(probe, Probe)
    if probe.body is None:
        assert probe.error in ERROR_KINDS and probe.detail
    else:
        assert probe.error is None and isinstance(probe.body, dict)


health_bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),  # NaN/Infinity included as Python writes
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [b"", b"[]", b"null", b"NaN", b'{"verdict": NaN}', b'{"step": 1e999}', b"{", b"\xff"]
    ),
    st.integers(5, 400).map(lambda n: json.dumps({"rules": deep(n)}).encode()),
)


@fuzz_settings(ci=40, full=1000)
@given(
    st.sampled_from([200, 200, 200, 204, 301, 404, 500, 503]),
    health_bodies,
    st.sampled_from([{"Content-Type": "application/json"}, {"Content-Type": "text/html"}, {}]),
)
def test_read_health_classifies_any_answer(
    endpoint: str, status: int, body: bytes, headers: dict[str, str]
) -> None:
    _serve(status, body, headers=headers)
    probe = read_health(endpoint, timeout=2.0)
    _classified(probe)
    if status >= 400:
        assert probe.error == "http_status"
    # whatever came back, the operator's next steps never raise either
    parsed = parse_body(probe.body) if probe.body is not None else None
    if parsed is not None:
        json.dumps(parsed, allow_nan=False)
    outcome = assess(SPEC, {}, probe, "2026-01-01T00:00:00Z", NOW)
    json.dumps(outcome.status, allow_nan=False)


def test_read_health_huge_slow_truncated_and_closed(endpoint: str) -> None:
    _serve(body=b"[" + b"1," * (HEALTH_BODY_LIMIT // 2 + 10) + b"1]")
    probe = read_health(endpoint, timeout=5.0)
    assert probe.error == "malformed" and "1 MiB" in probe.detail
    _serve(body=b'{"verdict": "Healthy"}', delay=1.5)
    assert read_health(endpoint, timeout=0.3).error == "timeout"
    _serve(body=b'{"verdict": "Healthy", "step"', length=10_000)  # claims more than it sends
    ANSWER.delay = 0.0
    probe = read_health(endpoint, timeout=0.5)
    _classified(probe)
    assert probe.body is None
    closed = read_health("http://127.0.0.1:9", timeout=0.5)  # nothing listens on discard
    assert closed.error in ("unreachable", "timeout")


@fuzz_settings(ci=60, full=2000)
@given(json_values | st.dictionaries(st.sampled_from(
    ["verdict", "step", "rules", "metrics", "epoch", "eta_seconds", "total_steps"]),
    json_values | st.sampled_from(["Healthy", "Degraded", "Critical", "Warning"]),
))  # fmt: skip
def test_parse_body_and_assess_never_raise(body: Any) -> None:
    parsed = parse_body(body)
    if parsed is not None:
        json.dumps(parsed, allow_nan=False)
    if isinstance(body, dict):
        outcome = assess(SPEC, {}, Probe(body=body), "2026-01-01T00:00:00Z", NOW)
        json.dumps(outcome.status, allow_nan=False)


# --- trace replay ----------------------------------------------------------------------------

garbage_lines = st.one_of(
    st.binary(max_size=80).filter(lambda b: b"\n" not in b and b"\r" not in b and b.strip()),
    st.sampled_from([b"{", b'{"step": 3', b"[1, 2]", b"NaN", b'"step"', b"\xff\xfe", b"{}"]),
    st.fixed_dictionaries(
        {"step": st.one_of(st.text(max_size=5), st.floats(), st.none(), st.lists(st.integers()))}
    ).map(lambda d: json.dumps(d).encode()),
)


def _line_ok(raw: bytes) -> bool:
    return b"\n" not in raw and b"\r" not in raw and b"\x0b" not in raw and b"\x0c" not in raw


@st.composite
def traces(draw: st.DrawFn) -> tuple[list[bytes], set[int]]:
    """Lines of a trace (valid records, some mangled, shuffled) and the numbers of bad lines."""
    n = draw(st.integers(1, 40))
    records = trace(n)
    if draw(st.booleans()):
        records = draw(st.permutations(records))  # out-of-order steps
    lines: list[bytes] = []
    for rec in records:
        mangle = draw(st.sampled_from(["keep"] * 4 + ["nan", "type", "truncate", "drop"]))
        if mangle == "nan":
            key = draw(st.sampled_from(sorted(rec)))
            rec = {**rec, key: draw(st.sampled_from(["NaN", "Infinity", float("nan"), None]))}
        elif mangle == "type":
            key = draw(st.sampled_from(sorted(rec)))
            rec = {**rec, key: draw(json_values)}
        raw = json.dumps(rec).encode()
        if mangle == "truncate":
            raw = raw[: draw(st.integers(1, max(1, len(raw) - 1)))]
        if mangle != "drop":
            lines.append(raw)
    for _ in range(draw(st.integers(0, 5))):
        lines.insert(draw(st.integers(0, len(lines))), draw(garbage_lines.filter(_line_ok)))
    bad = set()
    for i, raw in enumerate(lines, start=1):
        try:
            json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            bad.add(i)
    return lines, bad


def _replay(path: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["health", "replay", str(path), *args])
    return code, out.getvalue(), err.getvalue()


VERDICT_CODES = (c.EXIT_VERDICT_HEALTHY, c.EXIT_VERDICT_WARNING, c.EXIT_VERDICT_DEGRADED)


@fuzz_settings(ci=30, full=1000)
@given(traces())
def test_replay_never_tracebacks_and_names_bad_lines(
    tmp_path: Path, case: tuple[list[bytes], set[int]]
) -> None:
    lines, bad = case
    path = tmp_path / "trace.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    code, out, err = _replay(path, "--json")
    assert code in (*VERDICT_CODES, c.EXIT_USAGE), (code, err)
    if code == c.EXIT_USAGE:
        assert "lora-operator health replay:" in err and out == ""
        if lines:  # the first skipped line is named (path:LINE: skipped: why)
            assert re.search(rf"{re.escape(str(path))}:\d+: skipped: ", err), err
        return
    report = json.loads(out)  # strict JSON a script can read
    json.dumps(report, allow_nan=False)
    for number in sorted(bad)[:5]:  # the first warnings are shown, each naming its line
        assert f"{path}:{number}: skipped" in err


def test_replay_huge_file_of_garbage_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    path.write_bytes(b"{not json\n" * 200_000)
    code, out, err = _replay(path)
    assert code == c.EXIT_USAGE and f"{path}:1: skipped" in err and "200000 line(s)" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert _replay(empty)[0] == c.EXIT_USAGE
    assert _replay(tmp_path)[0] == c.EXIT_USAGE  # a directory
