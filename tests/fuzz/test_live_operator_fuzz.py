"""A few fuzzed bodies through the real operator (kopf in a thread) on the emulated API.

About 20 bodies: valid ones must get children; ones the CRD rejects must be refused by the
API (422 naming the field); ones that pass the CRD but not the operator's semantic checks
must get SpecAccepted=False naming a spec field and no children. The operator thread must
be alive at the end.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_operator.api import constants as c
from lora_operator.local.kubeapi import KubeError
from lora_operator.validation import validate_body
from tests.e2e.cluster import LFTS, condition, local_cluster, until
from tests.fuzz.strategies import invalid_bodies, section, valid_bodies

pytestmark = [pytest.mark.slow]

SEMANTIC = [  # pass the CRD, fail the operator's own checks
    ("spec.pod.env", {"pod": {"env": [{"name": "LORA_NNODES", "value": "4"}]}}),
    ("spec.monitoring.port", {"monitoring": {"port": 29500}}),
    ("spec.pod.volumes", {"pod": {"volumes": [{"name": "spec", "emptyDir": {}}]}}),
    ("spec.pod.labels", {"pod": {"labels": {c.LABEL_JOB_NAME: "x"}}}),
]


def _draw(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """N examples of STRATEGY (drawn once, outside the async test)."""
    out: list[Any] = []

    @settings(max_examples=n, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(x: Any) -> None:
        if len(out) < n:
            out.append(x)

    collect()
    return out


def _named(body: dict[str, Any], name: str) -> dict[str, Any]:
    body = copy.deepcopy(body)
    body["metadata"] = {"name": name}
    body["spec"].setdefault("runPolicy", {})["suspend"] = True  # no pod processes needed
    return body


async def test_fuzzed_bodies_through_the_live_operator(
    tmp_path: Path, quickstart_body: dict[str, Any]
) -> None:
    valid = [_named(b, f"valid-{i}") for i, b in enumerate(_draw(valid_bodies(), 6))]
    invalid = [(_named(b, f"bad-{i}"), m) for i, (b, m) in enumerate(_draw(invalid_bodies(), 10))]
    semantic = [
        (_named({**quickstart_body, "spec": {**quickstart_body["spec"], **patch}}, f"sem-{i}"), p)
        for i, (p, patch) in enumerate(SEMANTIC)
    ]
    async with local_cluster(tmp_path) as cluster:
        for body in valid:
            await cluster.client.create(LFTS, body)
        for body, mutation in invalid:
            try:
                await cluster.client.create(LFTS, body)
            except KubeError as err:  # the API server's schema/CEL check: 422 naming the field
                assert "422" in str(err) and section(mutation.path) in str(err), (mutation, err)
                continue
            # accepted by the API (e.g. a pruned unknown field): the operator must decide
            await _accepted_or_refused(cluster, body, mutation.path)
        for body, _path in semantic:
            assert validate_body(copy.deepcopy(body)).ok  # passes the CRD...
            await cluster.client.create(LFTS, body)
        for body, path in semantic:  # ...but the operator refuses it, naming the field
            name = body["metadata"]["name"]
            cond = await until(lambda n=name: _spec_accepted(cluster, n), timeout=30)
            assert cond["status"] == "False" and path in cond["message"], cond
            assert (await cluster.children(name))["configmaps"] == []
        for body in valid:
            name = body["metadata"]["name"]

            async def has_children(n: str = name) -> bool:
                return bool((await cluster.children(n))["configmaps"])

            await until(has_children, timeout=30)
            cond = condition(await cluster.lft(name), c.COND_SPEC_ACCEPTED)
            assert cond["status"] == "True", cond
        assert cluster.operator_running


async def _spec_accepted(cluster: Any, name: str) -> Any:
    return condition(await cluster.lft(name), c.COND_SPEC_ACCEPTED)


async def _accepted_or_refused(cluster: Any, body: dict[str, Any], path: str) -> None:
    """A body the API stored: it was pruned into a valid one, or the operator refuses it."""
    name = body["metadata"]["name"]
    cond = await until(lambda: _spec_accepted(cluster, name), timeout=30)
    stored = await cluster.lft(name)
    if cond["status"] == "False":
        assert section(path) in cond["message"], (path, cond)
        assert (await cluster.children(name))["configmaps"] == []
    else:
        assert validate_body({k: stored[k] for k in ("apiVersion", "kind", "spec")} | {
            "metadata": {"name": name}}).ok  # fmt: skip
