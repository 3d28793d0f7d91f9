"""What a finished run gained (pure): the eval metrics of summary.json, before -> after."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

GAIN_FIELDS = (
    ("eval_loss", "eval loss", ".3f"),
    ("eval_bleu", "BLEU", ".1f"),
    ("eval_rougeL", "ROUGE-L", ".3f"),
)


def gain_text(summary: Mapping[str, Any]) -> str:
    """`eval loss 5.404 -> 0.739, BLEU 0.8 -> 63.1, ROUGE-L 0.099 -> 0.788` (what is there)."""
    base, final = summary.get("baseline") or {}, summary.get("final") or {}
    parts = []
    for key, label, fmt in GAIN_FIELDS:
        if isinstance(final.get(key), int | float):
            before = f"{base[key]:{fmt}} -> " if isinstance(base.get(key), int | float) else ""
            parts.append(f"{label} {before}{final[key]:{fmt}}")
    return ", ".join(parts)


def termination_message(report: Mapping[str, Any], limit: int = 4096) -> str:
    """The trainer's last /health body as compact JSON within LIMIT bytes (what a container
    may leave in its termination log): evidence, then messages, then rules are cut to fit."""
    body = dict(report)
    rules = [dict(r) for r in body.get("rules") or []]
    for shrink in (_keep, _no_evidence, _short_messages, _first_rule):
        rules = shrink(rules)
        body["rules"] = rules
        text = json.dumps(body, separators=(",", ":"), allow_nan=False, default=str)
        if len(text.encode()) <= limit:
            return text
    return json.dumps({k: body.get(k) for k in ("verdict", "step", "total_steps")})


def _keep(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return rules


def _no_evidence(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "evidence"} for r in rules]


def _short_messages(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r | {"message": str(r.get("message") or "")[:200]} for r in rules]


def _first_rule(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return rules[:1]
