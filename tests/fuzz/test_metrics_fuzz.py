"""/metrics exposition text: the project's consumers and producers with odd input.

No product code parses exposition text: the only consumer is bench/operator_scale.py
(`scrape`, via prometheus_client's text_string_to_metric_families). So this fuzzes the
operator's own /metrics output (OperatorMetrics with arbitrary namespaces, names, phases and
Degraded reasons: unicode, quotes, backslashes, newlines) round-tripping through that parser,
and the parser on malformed text failing only with its documented ValueError.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from lora_operator.controller.metrics import READ_ERROR_KINDS, OperatorMetrics
from tests.fuzz.strategies import fuzz_settings

label_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
jobs = st.lists(
    st.tuples(label_text, label_text, st.none() | label_text, st.none() | label_text),
    max_size=8,
)


@fuzz_settings(ci=30, full=1000)
@given(jobs, st.lists(st.sampled_from(sorted(READ_ERROR_KINDS)), max_size=5))
def test_operator_metrics_render_and_parse_back(
    observed: list[tuple[str, str, str | None, str | None]], errors: list[str]
) -> None:
    metrics = OperatorMetrics(version='0.0.0-fuzz"\\\n')
    for namespace, name, phase, reason in observed:
        metrics.observe(namespace, name, phase, reason)
    for kind in errors:
        metrics.health_read_error(kind)
    with metrics.time_reconcile():
        pass
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    read_errors = {
        s.labels["kind"]: s.value
        for s in families["lora_operator_health_read_errors"].samples
        if s.name.endswith("_total")
    }
    assert read_errors == {k: float(errors.count(k)) for k in READ_ERROR_KINDS}
    reasons = {r for *_, r in observed if r is not None}
    transitions = families["lora_operator_degraded_transitions"].samples
    assert {s.labels["reason"] for s in transitions if s.name.endswith("_total")} == reasons


@fuzz_settings(ci=50, full=2000)
@given(st.text(max_size=300) | st.sampled_from(
    ["# TYPE x counter\nx_total NaN\n", "x{a=\"\\\"} 1\n", "x 1 2 3 4\n", "x{} +Inf\n",
     "# HELP\n", "x{a=\"b\",} 1e999\n", "\x00", "x{le=\"a\"} 1\n"]))  # fmt: skip
def test_exposition_parser_fails_only_with_value_error(text: str) -> None:
    try:
        for family in text_string_to_metric_families(text):
            list(family.samples)
    except ValueError:
        pass  # the parser's documented error; bench/operator_scale.py lets it surface
