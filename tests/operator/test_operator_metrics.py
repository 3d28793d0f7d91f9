"""The operator's /metrics, /healthz and /readyz as a scraper and the kubelet see them."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from lora_operator import __version__
from lora_operator.api import constants as c
from lora_operator.controller.httpserver import serve, stop
from lora_operator.controller.metrics import READ_ERROR_KINDS, OperatorMetrics

NS = "ml-team"
COLLAPSE = c.RULE_LORA_GRADIENT_COLLAPSE
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Probes:
    ready: threading.Event = field(default_factory=threading.Event)
    live: threading.Event = field(default_factory=threading.Event)


@dataclass
class Operator:
    metrics: OperatorMetrics
    probes: Probes
    base: str


@pytest.fixture
def operator() -> Iterator[Operator]:
    metrics, probes = OperatorMetrics(), Probes()
    probes.live.set()
    server = serve("127.0.0.1", 0, metrics, probes.ready.is_set, probes.live.is_set)
    host, port = server.server_address[:2]
    try:
        yield Operator(metrics, probes, f"http://{host!s}:{port}")
    finally:
        stop(server)


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, also for error statuses."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def scrape(op: Operator) -> Samples:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    status, content_type, body = get(op.base + "/metrics")
    assert status == 200 and content_type == CONTENT_TYPE_LATEST
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def phases(samples: Samples) -> dict[str, float]:
    return {dict(k[1])["phase"]: v for k, v in samples.items() if k[0] == "lora_operator_jobs"}


def degraded(samples: Samples) -> dict[tuple[str, str, str], float]:
    return {
        (d["namespace"], d["name"], d["reason"]): v
        for (name, labels), v in samples.items()
        if name == "lora_operator_degraded" and (d := dict(labels))
    }


def transitions(samples: Samples, reason: str) -> float:
    key = ("lora_operator_degraded_transitions_total", (("reason", reason),))
    return samples.get(key, 0.0)


def test_every_phase_is_exported_at_zero_before_any_job(operator: Operator) -> None:
    samples = scrape(operator)
    assert phases(samples) == dict.fromkeys(c.PHASES, 0.0)
    assert degraded(samples) == {}
    assert samples[("lora_operator_build_info", (("version", __version__),))] == 1.0


def test_phase_counts_follow_jobs_through_their_lifecycle(operator: Operator) -> None:
    m = operator.metrics
    m.observe(NS, "a", c.PHASE_PENDING, None)
    m.observe(NS, "b", c.PHASE_PENDING, None)
    m.observe("other", "a", c.PHASE_RUNNING, None)  # same name, other namespace: a new job
    counts = phases(scrape(operator))
    assert counts[c.PHASE_PENDING] == 2 and counts[c.PHASE_RUNNING] == 1

    m.observe(NS, "a", c.PHASE_RUNNING, None)
    m.observe(NS, "b", c.PHASE_SUCCEEDED, None)
    m.observe(NS, "b", c.PHASE_SUCCEEDED, None)  # a repeated reconcile counts once
    counts = phases(scrape(operator))
    assert counts[c.PHASE_PENDING] == 0
    assert counts[c.PHASE_RUNNING] == 2 and counts[c.PHASE_SUCCEEDED] == 1

    m.forget(NS, "b")
    m.forget(NS, "never-seen")  # deleting an unknown job is harmless
    counts = phases(scrape(operator))
    assert counts[c.PHASE_SUCCEEDED] == 0 and sum(counts.values()) == 2


def test_degraded_series_carries_the_rule_and_disappears_on_recovery(operator: Operator) -> None:
    m = operator.metrics
    m.observe(NS, "collapse", c.PHASE_RUNNING, COLLAPSE)
    m.observe(NS, "healthy", c.PHASE_RUNNING, None)
    assert degraded(scrape(operator)) == {(NS, "collapse", COLLAPSE): 1.0}

    m.observe(NS, "collapse", c.PHASE_RUNNING, None)  # the rule stopped firing
    assert degraded(scrape(operator)) == {}


def test_forget_removes_the_degraded_series(operator: Operator) -> None:
    operator.metrics.observe(NS, "collapse", c.PHASE_RUNNING, COLLAPSE)
    operator.metrics.forget(NS, "collapse")
    samples = scrape(operator)
    assert degraded(samples) == {} and sum(phases(samples).values()) == 0


def test_transitions_are_counted_once_per_transition(operator: Operator) -> None:
    m = operator.metrics
    for _ in range(3):  # three reconciles of one degraded job: one transition
        m.observe(NS, "a", c.PHASE_RUNNING, COLLAPSE)
    samples = scrape(operator)
    assert transitions(samples, COLLAPSE) == 1

    m.observe(NS, "a", c.PHASE_RUNNING, c.RULE_STALLED)  # the reason changed: a transition
    m.observe(NS, "a", c.PHASE_RUNNING, None)  # recovery is not an entry
    m.observe(NS, "a", c.PHASE_RUNNING, COLLAPSE)  # degraded again
    samples = scrape(operator)
    assert transitions(samples, COLLAPSE) == 2 and transitions(samples, c.RULE_STALLED) == 1
    assert degraded(samples) == {(NS, "a", COLLAPSE): 1.0}


def test_health_read_errors_are_counted_by_kind(operator: Operator) -> None:
    m = operator.metrics
    m.health_read_error("timeout")
    m.health_read_error("timeout")
    m.health_read_error("malformed")
    samples = scrape(operator)
    errors = {
        dict(labels)["kind"]: v
        for (name, labels), v in samples.items()
        if name == "lora_operator_health_read_errors_total"
    }
    assert errors == {"unreachable": 0, "timeout": 2, "http_status": 0, "malformed": 1}
    assert set(errors) == set(READ_ERROR_KINDS)
    with pytest.raises(ValueError, match="unknown"):
        m.health_read_error("dns")  # an unbounded kind label would be a bug


def test_reconcile_durations_land_in_the_histogram(operator: Operator) -> None:
    m = operator.metrics
    with m.time_reconcile():
        pass
    with pytest.raises(RuntimeError), m.time_reconcile():
        raise RuntimeError("a failed reconcile still took time")
    samples = scrape(operator)
    assert samples[("lora_operator_reconcile_duration_seconds_count", ())] == 2
    fast = ("lora_operator_reconcile_duration_seconds_bucket", (("le", "0.1"),))
    assert samples[fast] == 2
    assert ("lora_operator_reconcile_duration_seconds_bucket", (("le", "0.001"),)) in samples
    assert ("lora_operator_reconcile_duration_seconds_bucket", (("le", "10.0"),)) in samples


def test_readyz_is_503_until_ready(operator: Operator) -> None:
    assert get(operator.base + "/readyz")[0] == 503
    operator.probes.ready.set()
    status, _, body = get(operator.base + "/readyz")
    assert status == 200 and body == "ok\n"


def test_healthz_is_503_when_not_live(operator: Operator) -> None:
    assert get(operator.base + "/healthz")[:3:2] == (200, "ok\n")
    operator.probes.live.clear()
    assert get(operator.base + "/healthz")[0] == 503


def test_a_raising_probe_check_is_a_failed_probe() -> None:
    def broken() -> bool:
        raise RuntimeError("check failed")

    server = serve("127.0.0.1", 0, OperatorMetrics(), broken, broken)
    host, port = server.server_address[:2]
    try:
        assert get(f"http://{host!s}:{port}/readyz")[0] == 503
        assert get(f"http://{host!s}:{port}/healthz")[0] == 503
    finally:
        stop(server)


def test_unknown_paths_are_404(operator: Operator) -> None:
    assert get(operator.base + "/")[0] == 404
    assert get(operator.base + "/metricsx")[0] == 404


def test_registries_are_private(operator: Operator) -> None:
    other = OperatorMetrics()  # a second instance must not clash with the first
    other.observe(NS, "a", c.PHASE_FAILED, None)
    assert phases(scrape(operator))[c.PHASE_FAILED] == 0
    assert b'lora_operator_jobs{phase="Failed"} 1.0' in other.render()
