"""The rule docs: generated table in sync, a runbook for every rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_operator.api import constants as c
from lora_operator.cli import main
from lora_operator.health import RULES
from lora_operator.health.reference import render_rules_doc
from tests.conftest import ROOT

DOCS = ROOT / "docs"


def test_rules_doc_is_generated_from_the_rules() -> None:
    text = (DOCS / "health-rules.md").read_text()
    assert text == render_rules_doc(), "docs/health-rules.md drifted: run make crds"
    assert "max(`spec.health.grace.minSteps` (default 50), min(warmup steps," in text
    for rule in RULES:
        assert f"[{rule.name}](runbooks/{rule.name}.md) | {rule.severity} |" in text


def test_every_rule_is_defined_in_constant_order() -> None:
    assert tuple(rule.name for rule in RULES) == c.RULE_NAMES


@pytest.mark.parametrize("name", c.RULE_NAMES)
def test_runbook_for_every_rule(name: str) -> None:
    text = (DOCS / "runbooks" / f"{name}.md").read_text()
    assert text.startswith(f"# {name}\n")
    for heading in ("## Meaning", "## Evidence", "## Likely causes", "## The fix"):
        assert heading in text


def test_crds_check_detects_a_stale_rules_doc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "health-rules.md"
    stale.write_text("old\n")
    args = ["crds", "--dir", str(ROOT / "crds"), "--reference", str(DOCS / "api.md")]
    assert main([*args, "--check", "--rules-doc", str(stale)]) == c.EXIT_ERROR
    assert "health-rules.md is out of date" in capsys.readouterr().err
    assert main([*args, "--rules-doc", str(stale)]) == c.EXIT_OK
    assert stale.read_text() == render_rules_doc()


def test_the_observability_page_lists_exactly_the_shipped_alerts() -> None:
    """docs/observability.md's alert table names every alert of the chart's generated rule
    file, and no other; every metric the page names is one the trainer or operator exports."""
    import re

    import yaml

    text = (DOCS / "observability.md").read_text()
    rules = ROOT / "charts" / "lora-operator" / "files" / "rules" / "alerts.yaml"
    shipped = {
        rule["alert"]
        for group in yaml.safe_load(rules.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    documented = set(re.findall(r"^\| `(LoRA[A-Za-z]+)` \|", text, flags=re.M))
    assert documented == shipped
    known = (DOCS / "metrics.md").read_text() + (DOCS / "operator.md").read_text()
    for metric in set(re.findall(r"\blora_(?:trainer|operator)_[a-z_]+", text)):
        base = metric.removesuffix("_total")
        assert f"`{metric}`" in known or f"`{base}_total`" in known, metric
