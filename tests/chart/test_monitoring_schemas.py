"""The chart's monitoring.coreos.com/v1 objects validate against prometheus-operator's CRD schemas.

The schemas are vendored test data (tests/chart/data/prometheus-operator/, SOURCE.md there says
where they come from): the openAPIV3Schema of the ServiceMonitor, PodMonitor and PrometheusRule
CRDs of prometheus-operator v0.57.0, as the npm package @kubernetes-models/prometheus-operator
4.0.0 ships them. They are OpenAPI v3 (Kubernetes structural) schemas; `openapi_to_draft7` turns
them into JSON Schema Draft 7 with these adjustments, each mirroring what the API server does:

* `nullable: true` (an OpenAPI keyword Draft 7 does not know) becomes "or null" (a type list).
* int-or-string fields (`x-kubernetes-int-or-string: true` in the CRD, e.g. `targetPort`, a
  rule's `expr`) are already spelled `anyOf: [{type: integer}, {type: string}]` in the data, as
  controller-gen writes them, so they need no format of their own; `x-kubernetes-*` keys, were
  any left, are annotations that Draft 7 ignores. `format: int64` is not checked (no format
  checker), as Kubernetes leaves it to the type.
* `metadata` refers to apimachinery's ObjectMeta, which is not vendored: a small ObjectMeta
  schema stands in (name and namespace strings, labels/annotations string maps).
* Strict fields: an object schema with declared properties and no `additionalProperties` gets
  `additionalProperties: false`, as `kubectl apply --validate=strict` (server-side field
  validation) rejects unknown fields rather than pruning them. A field newer than v0.57.0 would
  fail here: vendor a newer schema then.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator

from tests.chart.conftest import MONITORING_API, by_kind, render

DATA = Path(__file__).parent / "data" / "prometheus-operator"
SCHEMA_FILES = {
    "ServiceMonitor": "servicemonitor.json",
    "PodMonitor": "podmonitor.json",
    "PrometheusRule": "prometheusrule.json",
}
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
# The chart's value matrix: defaults, Prometheus selecting by release label, and Grafana-managed
# alerts (the PrometheusRule then keeps only the recording rules).
VALUES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "release-labels": {"monitoring": {"releaseLabels": {"release": "kube-prometheus-stack"}}},
    "grafana-alerts": {"grafana": {"alerts": {"enabled": True}}},
}


def openapi_to_draft7(node: Any) -> Any:
    """A copy of the OpenAPI v3 schema NODE as strict JSON Schema Draft 7 (module docstring)."""
    if isinstance(node, list):
        return [openapi_to_draft7(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_draft7(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if out.pop("nullable", False):
        if "type" in out:  # a type list keeps errors at the offending field
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    if "properties" in out and out.get("properties") and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@functools.cache
def validator(kind: str) -> Draft7Validator:
    schema = json.loads((DATA / SCHEMA_FILES[kind]).read_text())
    schema["properties"]["metadata"] = OBJECT_META
    draft7 = openapi_to_draft7(schema)
    Draft7Validator.check_schema(draft7)
    return Draft7Validator(draft7)


def errors(obj: dict[str, Any]) -> list[str]:
    """Each schema violation of OBJ as 'path: message' (empty when it validates)."""
    found = validator(obj["kind"]).iter_errors(obj)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found)


def monitoring_objects(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in render(values) if o["apiVersion"] == MONITORING_API]


def rendered(kind: str) -> dict[str, Any]:
    """A deep copy of the default render's KIND object, to break in a negative test."""
    (obj,) = by_kind(monitoring_objects({}), kind)
    return copy.deepcopy(obj)


def test_vendored_schemas_are_the_three_crds() -> None:
    for kind in SCHEMA_FILES:
        props = validator(kind).schema["properties"]
        assert props["kind"]["enum"] == [kind]
        assert props["apiVersion"]["enum"] == [MONITORING_API]


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_monitoring_objects_validate(values: dict[str, Any]) -> None:
    objs = monitoring_objects(values)
    assert sorted(o["kind"] for o in objs) == sorted(SCHEMA_FILES), "each kind renders once"
    problems = {f"{o['kind']}/{o['metadata']['name']}": errors(o) for o in objs}
    assert not any(problems.values()), problems


def test_release_labels_reach_every_monitoring_object() -> None:
    for obj in monitoring_objects(VALUES["release-labels"]):
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack", obj["kind"]


def test_int_or_string_accepts_both() -> None:
    obj = rendered("ServiceMonitor")
    for target_port in (8080, "metrics"):
        obj["spec"]["endpoints"][0]["targetPort"] = target_port
        assert not errors(obj), target_port
    obj["spec"]["endpoints"][0]["targetPort"] = 8080.5
    assert errors(obj)


def test_servicemonitor_port_must_be_a_string() -> None:
    obj = rendered("ServiceMonitor")
    obj["spec"]["endpoints"][0]["port"] = 123
    assert errors(obj) == ["spec/endpoints/0/port: 123 is not of type 'string', 'null'"]


def test_unknown_spec_field_is_rejected() -> None:
    obj = rendered("ServiceMonitor")
    obj["spec"]["endpoint"] = obj["spec"]["endpoints"]
    (problem,) = errors(obj)
    assert problem.startswith("spec: Additional properties are not allowed ('endpoint'")


def test_podmonitor_namespace_selector_any_is_a_boolean() -> None:
    obj = rendered("PodMonitor")
    obj["spec"]["namespaceSelector"]["any"] = "true"
    assert errors(obj) == ["spec/namespaceSelector/any: 'true' is not of type 'boolean', 'null'"]


def test_prometheusrule_for_must_be_a_duration_string() -> None:
    obj = rendered("PrometheusRule")
    rules = obj["spec"]["groups"][0]["rules"]
    index = next(i for i, rule in enumerate(rules) if "for" in rule)
    rules[index]["for"] = 5
    problems = errors(obj)
    assert len(problems) == 1 and problems[0].startswith(f"spec/groups/0/rules/{index}/for: 5 ")


def test_prometheusrule_rule_needs_expr() -> None:
    obj = rendered("PrometheusRule")
    del obj["spec"]["groups"][0]["rules"][0]["expr"]
    assert errors(obj) == ["spec/groups/0/rules/0: 'expr' is a required property"]
