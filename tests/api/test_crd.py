"""The generated CRD: no drift, a valid and structural CustomResourceDefinition."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import yaml

from lora_operator.api import constants as c
from lora_operator.api.crd import CRD_FILE, build_crd, render_crd
from tests.conftest import ROOT

CRD_PATH = ROOT / "crds" / CRD_FILE


def test_committed_crd_matches_the_models() -> None:
    assert CRD_PATH.read_text() == render_crd(), "crds/ drifted from the models: run make crds"


def test_crd_file_says_it_is_generated() -> None:
    assert CRD_PATH.read_text().startswith("# Generated from lora_operator.api")


def test_crd_is_a_valid_custom_resource_definition() -> None:
    crd = yaml.safe_load(CRD_PATH.read_text())
    # strict: unknown fields anywhere in the CRD object are errors
    kubernetes_validate.validate(crd, "1.35.0", strict=True)
    kubernetes_validate.validate(crd, "1.31.0", strict=True)


def _non_structural(node: dict[str, Any], path: str) -> list[str]:
    """Violations of the Kubernetes structural-schema rules below one node."""
    bad = []
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        bad.append(f"{path}: no type")
    for key in ("$ref", "anyOf", "oneOf", "allOf", "not", "nullable", "additionalItems"):
        if key in node:
            bad.append(f"{path}: {key} is not structural here")
    if "properties" in node and "additionalProperties" in node:
        bad.append(f"{path}: properties and additionalProperties together")
    if node.get("type") == "object" and not (
        "properties" in node or "additionalProperties" in node or preserve
    ):
        bad.append(f"{path}: object without properties would be pruned to {{}}")
    if node.get("type") == "array" and "items" not in node:
        bad.append(f"{path}: array without items")
    for name, sub in node.get("properties", {}).items():
        bad += _non_structural(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            bad += _non_structural(node[key], f"{path}[{key}]")
    return bad


def test_schema_is_structural() -> None:
    version = build_crd()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    # metadata is allowed to be a bare object at the root only
    schema = {**schema, "properties": {**schema["properties"], "metadata": {"type": "string"}}}
    assert _non_structural(schema, "") == []


def test_names_printer_columns_and_status_subresource() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (c.KIND, c.PLURAL, ["lft"])
    assert crd["metadata"]["name"] == "lorafinetunes.lora-operator.dev"
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    default_columns = [
        col["name"] for col in version["additionalPrinterColumns"] if not col.get("priority")
    ]
    assert default_columns == ["Phase", "Health", "Step", "Loss", "Age"]


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    missing: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        for name, sub in node.get("properties", {}).items():
            if not sub.get("description"):
                missing.append(f"{path}.{name}")
            walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema["properties"]["spec"], "spec")
    walk(schema["properties"]["status"], "status")
    assert missing == []


def test_defaults_are_valid_against_their_own_schema() -> None:
    import jsonschema

    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    def walk(node: dict[str, Any], path: str) -> None:
        if "default" in node:
            jsonschema.Draft4Validator(node).validate(node["default"])
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema, "")


def test_api_reference_doc_matches_the_models() -> None:
    from lora_operator.api.reference import render_reference

    text = (ROOT / "docs" / "api.md").read_text()
    assert text == render_reference(), "docs/api.md drifted: run make crds"
    assert "| `spec.lora.r` | integer | `16` |" in text
