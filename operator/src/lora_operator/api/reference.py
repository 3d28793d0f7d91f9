"""docs/api.md, generated from the CRD schema (the same text as kubectl explain)."""

from __future__ import annotations

import json
from typing import Any

from lora_operator.api import constants as c
from lora_operator.api.crd import resource_schema

HEADER = (
    "<!-- Generated from lora_operator.api by `make crds`; do not edit by hand. -->\n\n"
    f"# {c.KIND} API reference ({c.API_VERSION})\n\n"
    "Every field of `spec` and `status`, with its type, default and constraints. "
    "Cross-field rules (CEL) are listed under the object they apply to.\n"
)


def _type(node: dict[str, Any]) -> str:
    kind = str(node.get("type", "object"))
    if kind == "array":
        return f"[]{_type(node.get('items', {}))}"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    return kind


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    for key, label in (
        ("minimum", ">="),
        ("maximum", "<="),
        ("minItems", "items >="),
        ("maxItems", "items <="),
        ("maxLength", "length <="),
    ):
        if key in node:
            strict = node.get(f"exclusive{key[:1].upper()}{key[1:]}") is True
            op = label.replace("=", "") if strict else label
            parts.append(f"{op} {node[key]}")
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    return ", ".join(parts).replace("|", "\\|")


def _rows(node: dict[str, Any], path: str, required: set[str]) -> list[str]:
    rows = []
    for name, sub in node.get("properties", {}).items():
        field = f"{path}.{name}"
        default = (
            f"`{json.dumps(sub['default'])}`"
            if "default" in sub
            else ("required" if name in required else "")
        )
        desc = str(sub.get("description", "")).replace("|", "\\|")
        rows.append(f"| `{field}` | {_type(sub)} | {default} | {_constraints(sub)} | {desc} |")
        child = sub.get("items", sub) if sub.get("type") == "array" else sub
        rows += _rows(
            child,
            field + ("[]" if sub.get("type") == "array" else ""),
            set(child.get("required", [])),
        )
    return rows


def _rules(node: dict[str, Any], path: str) -> list[str]:
    out = [
        f"- `{path.lstrip('.') or '(the object)'}`: `{r['rule']}` — {r['message']}"
        for r in node.get("x-kubernetes-validations", [])
    ]
    for name, sub in node.get("properties", {}).items():
        out += _rules(
            sub.get("items", sub) if sub.get("type") == "array" else sub, f"{path}.{name}"
        )
    return out


def render_reference() -> str:
    schema = resource_schema()
    parts = [HEADER]
    for section in ("spec", "status"):
        node = schema["properties"][section]
        parts.append(f"\n## {section}\n\n| field | type | default | constraints | description |")
        parts.append("|---|---|---|---|---|")
        parts += _rows(node, section, set(node.get("required", [])))
    parts.append("\n## Cross-field rules (CEL, checked by the API server and the models)\n")
    parts += _rules(schema, "")
    return "\n".join(parts) + "\n"
