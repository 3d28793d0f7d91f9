"""Hypothesis strategies and settings profiles for the fuzz tests.

Profiles (pick with LORA_FUZZ_PROFILE): `ci` (default, bounded: the whole tests/fuzz set
within a minute on 2 cores; derandomized, so CI draws the same examples every run and a
failure reproduces) and `chaos_full` (2,000 fresh random examples per test: `make fuzz`).

Bodies are derived from examples/*.yaml. Valid ones get a random subset of valid field values;
invalid ones get exactly one mutation at a path of the CRD schema (wrong type, out of range,
enum or pattern miss, unknown field, missing required field, deep nesting), so each one has a
known field the problems must name.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from lora_operator.api.crd import resource_schema
from lora_operator.builders.names import RENDEZVOUS_PORT
from tests.conftest import EXAMPLES, deep_merge

PROFILE_ENV = "LORA_FUZZ_PROFILE"
CI_EXAMPLES = int(os.environ.get("LORA_FUZZ_CI_EXAMPLES", "50"))
FULL_EXAMPLES = 2000

_COMMON = {
    "deadline": None,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
}
settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, **_COMMON)
settings.register_profile("chaos_full", max_examples=FULL_EXAMPLES, derandomize=False, **_COMMON)


def profile_name() -> str:
    return os.environ.get(PROFILE_ENV, "ci")


def fuzz_settings(ci: int | None = None, full: int | None = None) -> settings:
    """Settings of the active profile; CI (FULL) overrides its example count for slow tests."""
    base = settings.get_profile(profile_name())
    if profile_name() == "chaos_full":
        return settings(base, max_examples=full or base.max_examples)
    return settings(base, max_examples=ci or base.max_examples)


# --- bodies ------------------------------------------------------------------------------

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
EXAMPLE_BODIES: list[dict[str, Any]] = [yaml.safe_load(p.read_text()) for p in EXAMPLE_FILES]
SPEC_SCHEMA: dict[str, Any] = resource_schema()["properties"]["spec"]

label_key = st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?/[a-z]{1,10}\Z|\A[a-z]{1,12}\Z")
label_value = st.from_regex(r"\A([A-Za-z0-9]([A-Za-z0-9_.-]{0,30}[A-Za-z0-9])?)?\Z")
dns = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?\Z")
unicode_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
finite = {"allow_nan": False, "allow_infinity": False}


def _user_env() -> st.SearchStrategy[list[dict[str, Any]]]:
    var = st.fixed_dictionaries(
        {"name": st.from_regex(r"\AUSER_[A-Z0-9_]{0,12}\Z")},
        optional={"value": unicode_text},
    ).map(lambda v: v if "value" in v else {**v, "value": ""})
    secret = st.fixed_dictionaries(
        {
            "name": st.from_regex(r"\AUSER_[A-Z0-9_]{0,12}\Z"),
            "secretKeyRef": st.fixed_dictionaries(
                {"name": dns, "key": st.from_regex(r"\A[-._a-zA-Z0-9]{1,20}\Z")}
            ),
        }
    )
    return st.lists(st.one_of(var, secret), max_size=4, unique_by=lambda v: v["name"])


toleration = st.fixed_dictionaries(
    {},
    optional={
        "key": st.from_regex(r"\A[a-z]{1,10}\Z"),
        "operator": st.sampled_from(["Exists", "Equal"]),
        "value": st.from_regex(r"\A[a-z0-9]{0,10}\Z"),
        "effect": st.sampled_from(["NoSchedule", "PreferNoSchedule", "NoExecute"]),
        "tolerationSeconds": st.integers(0, 2**31),
    },
)

# One valid value (or sub-object) per entry; a valid body merges a random subset of them.
VALID_PATCHES: dict[str, st.SearchStrategy[Any]] = {
    "lora": st.fixed_dictionaries(
        {},
        optional={
            "r": st.integers(1, 1024).map(lambda r: r + r % 2 if r < 1024 else r),
            "alpha": st.floats(1e-6, 1e6, **finite),
            "dropout": st.floats(0.0, 0.999, **finite),
            "targetModules": st.lists(st.sampled_from(["q_proj", "v_proj", "up"]), min_size=1),
            "init": st.sampled_from(["default", "gaussian", "pissa", "olora", "pissa_niter_4"]),
            "useRslora": st.booleans(),
        },
    ),
    "training": st.fixed_dictionaries(
        {},
        optional={
            "learningRate": st.floats(0.0, 1.0, **finite),
            "microBatchSize": st.integers(1, 4096),
            "gradientAccumulationSteps": st.integers(1, 4096),
            "maxGradNorm": st.floats(0.0, 1e9, **finite),
            "scheduler": st.sampled_from(["cosine", "linear", "constant", "constant_with_warmup"]),
            "precision": st.sampled_from(["bf16", "fp16", "fp32"]),
            "seed": st.integers(0, 2**31 - 1),
            "checkpointEverySteps": st.integers(1, 2**62),
        },
    ),
    "dataset": st.fixed_dictionaries(
        {}, optional={"maxLength": st.integers(16, 131072), "packing": st.booleans()}
    ),
    "monitoring": st.fixed_dictionaries(
        {},
        optional={
            "port": st.integers(1024, 65535).filter(lambda p: p != RENDEZVOUS_PORT),
            "intervalSteps": st.integers(1, 100000),
            "perModule": st.booleans(),
        },
    ),
    "health": st.fixed_dictionaries(
        {},
        optional={
            "onDegraded": st.sampled_from(["Alert", "Suspend", "Fail"]),
            "consecutiveEvaluations": st.integers(1, 100),
            "stallTimeoutSeconds": st.integers(60, 2**40),
            "rules": st.just([{"name": "LoRAGradientCollapse", "threshold": 0.5}]),
        },
    ),
    "runPolicy": st.fixed_dictionaries(
        {},
        optional={
            "suspend": st.booleans(),
            "backoffLimit": st.integers(0, 100),
            "activeDeadlineSeconds": st.integers(1, 2**40),
            "ttlSecondsAfterFinished": st.integers(0, 2**31),
        },
    ),
    "pod": st.fixed_dictionaries(
        {},
        optional={
            "nodeSelector": st.dictionaries(label_key, label_value, max_size=3),
            "tolerations": st.lists(toleration, max_size=3),
            "env": _user_env(),
            "annotations": st.dictionaries(label_key, unicode_text, max_size=3),
            "labels": st.dictionaries(
                label_key.filter(lambda k: "lora-operator" not in k and "app.kubernetes" not in k),
                label_value,
                max_size=3,
            ),
            "priorityClassName": dns,
            "serviceAccountName": dns,
        },
    ),
    "resources": st.fixed_dictionaries(
        {},
        optional={
            "cpu": st.from_regex(r"\A[0-9]{1,3}(\.[0-9]{1,2})?m?\Z"),
            "memory": st.from_regex(r"\A[1-9][0-9]{0,3}([KMGT]i?)?\Z"),
        },
    ),
    "image": st.from_regex(r"\A[a-z0-9.]{1,20}/[a-z0-9]{1,20}:[a-z0-9.]{1,10}\Z"),
}


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """An example with a random subset of valid field values merged into its spec."""
    base = draw(st.sampled_from(EXAMPLE_BODIES))
    keys = draw(st.sets(st.sampled_from(sorted(VALID_PATCHES))))
    patch = {key: draw(VALID_PATCHES[key]) for key in sorted(keys)}
    body = deep_merge(base, {"spec": patch})
    if body["spec"]["lora"].get("init") == "orthogonal" and body["spec"]["lora"].get("r", 16) % 2:
        body["spec"]["lora"]["r"] = 16
    return body


# --- invalid values, derived from the CRD schema ------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """What was broken: the dotted field path (spec.a.b) and how."""

    path: str
    kind: str
    value: Any = None

    def __str__(self) -> str:
        return f"{self.kind} at {self.path}: {self.value!r}"[:300]


def schema_nodes(schema: dict[str, Any], path: str = "spec") -> list[tuple[str, dict[str, Any]]]:
    """(path, schema) of every declared field under spec, lists as their first item."""
    out = [(path, schema)]
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return out
    for key, sub in (schema.get("properties") or {}).items():
        out += schema_nodes(sub, f"{path}.{key}")
    if "items" in schema and schema["items"].get("properties"):
        out += schema_nodes(schema["items"], f"{path}[0]")
    return out


SPEC_NODES = [(p, s) for p, s in schema_nodes(SPEC_SCHEMA) if p != "spec"]
OBJECT_NODES = [(p, s) for p, s in SPEC_NODES if s.get("properties")] + [("spec", SPEC_SCHEMA)]
REQUIRED = [
    (f"{p}.{name}", s)
    for p, s in [("spec", SPEC_SCHEMA), *OBJECT_NODES]
    for name in s.get("required", [])
]
# Integer fields without an upper bound: a value past int64 is one no API server stores.
UNBOUNDED_INTS = [
    p for p, s in SPEC_NODES if s.get("type") == "integer" and "maximum" not in s and "[" not in p
]


def _wrong_types(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    kind = schema.get("type")
    scalar_text = st.one_of(unicode_text, st.sampled_from(["", "1", "true", "NaN", "null"]))
    table: dict[str | None, st.SearchStrategy[Any]] = {
        "integer": st.one_of(
            scalar_text,
            st.booleans(),
            st.floats(allow_nan=True).filter(lambda f: not f.is_integer()),
            st.lists(st.integers(), max_size=2),
            st.just({"value": 1}),
        ),
        "number": st.one_of(
            scalar_text, st.booleans(), st.lists(st.floats(), max_size=2), st.just({})
        ),
        "string": st.one_of(
            st.integers(), st.booleans(), st.floats(**finite), st.lists(unicode_text, max_size=2)
        ),
        "boolean": st.one_of(st.sampled_from(["yes", "true", "on"]), st.integers(), st.floats()),
        "array": st.one_of(unicode_text, st.integers(), st.just({"0": "x"})),
        "object": st.one_of(unicode_text, st.integers(), st.lists(st.integers(), max_size=2)),
    }
    return table.get(kind, st.nothing())


def _out_of_range(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    kind = schema.get("type")
    options: list[st.SearchStrategy[Any]] = []
    if kind in ("integer", "number"):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        integral = kind == "integer"
        if lo is not None:
            below = (
                st.integers(max_value=math.ceil(lo) - 1, min_value=-(10**30))
                if integral
                else st.floats(max_value=lo, exclude_max=not schema.get("exclusiveMinimum"))
            )
            options.append(below)
            if not integral:
                options.append(st.just(-math.inf))
        if hi is not None:
            above = (
                st.integers(min_value=math.floor(hi) + 1, max_value=2**62)
                if integral
                else st.floats(min_value=hi, exclude_min=not schema.get("exclusiveMaximum"))
            )
            options += [above, st.just(10**30) if integral else st.just(math.inf)]
        if not integral and (lo is not None or hi is not None):
            options.append(st.just(math.nan))
    if kind == "string":
        if "enum" in schema:
            options.append(unicode_text.filter(lambda s: s not in schema["enum"]))
        if "pattern" in schema:
            rx = re.compile(schema["pattern"])
            options.append(
                st.one_of(
                    unicode_text, st.sampled_from(["", " ", "hf:// x", "\u00e9\u00e9"])
                ).filter(lambda s: not rx.search(s))
            )
        if "maxLength" in schema:
            options.append(st.just("a" * (schema["maxLength"] + 1)))
    if kind == "array":
        if schema.get("minItems"):
            options.append(st.just([]))
        if "maxItems" in schema and "enum" in (schema.get("items") or {}):
            options.append(st.just(list(schema["items"]["enum"]) * (schema["maxItems"] + 1)))
    return st.one_of(options) if options else st.nothing()


def deep(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = {"a": value} if i % 2 else [value]
    return value


def _set(body: dict[str, Any], path: str, value: Any, *, delete: bool = False) -> bool:
    """Set (or delete) PATH (spec.a[0].b) in BODY, creating objects and one-item lists on the
    way; False when the path cannot be reached without changing another field's type."""
    parts = re.findall(r"[^.\[\]]+|\[0\]", path)
    node: Any = body
    for part, nxt in zip(parts, parts[1:], strict=False):
        if part == "[0]":
            if not isinstance(node, list):
                return False
            if not node:
                node.append({})
            node = node[0]
        else:
            if not isinstance(node, dict):
                return False
            if part not in node or node[part] is None:
                node[part] = [] if nxt == "[0]" else {}
            node = node[part]
        if not isinstance(node, dict | list):
            return False
    last = parts[-1]
    if last == "[0]":  # an array item (spec.pod.tolerations[0])
        if not isinstance(node, list):
            return False
        del node[:1]
        if not delete:
            node.insert(0, value)
        return True
    if not isinstance(node, dict):
        return False
    if delete:
        node.pop(last, None)
    else:
        node[last] = value
    return True


@st.composite
def invalid_bodies(draw: st.DrawFn) -> tuple[dict[str, Any], Mutation]:
    """A valid body with exactly one field broken (see Mutation)."""
    body = copy.deepcopy(draw(valid_bodies()))
    kind = draw(st.sampled_from(["type", "range", "unknown", "missing", "nested", "unicode-key"]))
    if kind == "type":
        path, schema = draw(st.sampled_from(SPEC_NODES))
        value = draw(_wrong_types(schema))
    elif kind == "range":
        candidates = [(p, s) for p, s in SPEC_NODES if not _out_of_range(s).is_empty]
        path, schema = draw(st.sampled_from(candidates))
        value = draw(_out_of_range(schema))
    elif kind in ("unknown", "nested", "unicode-key"):
        parent, schema = draw(st.sampled_from(OBJECT_NODES))
        known = set(schema.get("properties") or {})
        key_strategy = (
            unicode_text.filter(lambda k: bool(k) and "." not in k and "[" not in k)
            if kind == "unicode-key"
            else st.from_regex(r"\A[a-zA-Z][a-zA-Z0-9]{0,15}\Z")
        )
        key = draw(key_strategy.filter(lambda k: k not in known))
        path = f"{parent}.{key}"
        value = deep(draw(st.integers(5, 200))) if kind == "nested" else draw(unicode_text)
    else:
        path, _ = draw(st.sampled_from(REQUIRED))
        if not _set(body, path, None, delete=True):
            kind = "type"
            path, value = "spec.lora", "not an object"
            _set(body, path, value)
        return body, Mutation(path, kind)
    if not _set(body, path, value):
        path, value = "spec.training", ["not", "an", "object"]
        _set(body, path, value)
    return body, Mutation(path, kind, value)


def section(path: str) -> str:
    """spec.SECTION of a field path (spec.a.b[0].c -> spec.a)."""
    return ".".join(re.split(r"[.\[]", path)[:2])


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    unicode_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(unicode_text, inner, max_size=5)
    ),
    max_leaves=30,
)
