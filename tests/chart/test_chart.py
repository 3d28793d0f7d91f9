"""The Helm chart: lint, render over a values matrix, validate, and keep RBAC honest.

Everything runs the real helm (v4) offline. Core objects are validated against the
Kubernetes 1.31 OpenAPI schemas (kubernetes-validate, strict). Custom resources are not in
those schemas: the kopf peering objects are checked against the kopf CRD the chart renders;
the monitoring.coreos.com objects are checked structurally here (their schemas are the
prometheus-operator CRDs, which this repository does not vendor).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lora_operator.api import constants as c
from tests.chart.conftest import (
    CHART,
    NAMESPACE,
    RELEASE,
    by_kind,
    helm,
    one,
    render,
    template_args,
)
from tests.conftest import ROOT
from tests.operator.test_builders import _restricted_violations

K8S_VERSION = "1.31.0"
CRD_FILES = sorted((ROOT / "crds").glob("*.yaml"))
KEEP = "helm.sh/resource-policy"

MATRIX: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "monitoring-off": {"monitoring": {"enabled": False}},
    "crds-off": {"crds": {"enabled": False}},
    "grafana-alerts": {"grafana": {"alerts": {"enabled": True}}},
    "replicas-2": {"replicas": 2},
    "replicas-2-namespaced": {"replicas": 2, "watchNamespaces": ["team-a", "team-b"]},
}

# What the operator's API clients (kopf's and the kubernetes client's) did through one job
# lifecycle, recorded by test_clusterrole_grants_exactly_what_the_operator_used:
# (apiGroup, resource[/subresource], verb).
RECORDED = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),  # kopf's resource scan
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("lora-operator.dev", "lorafinetunes", "list"),  # kopf
    ("lora-operator.dev", "lorafinetunes", "watch"),  # kopf
    ("lora-operator.dev", "lorafinetunes", "patch"),  # kopf's progress annotations
    ("lora-operator.dev", "lorafinetunes", "get"),  # every reconcile
    ("lora-operator.dev", "lorafinetunes", "delete"),  # ttlSecondsAfterFinished
    ("lora-operator.dev", "lorafinetunes/status", "patch"),
    ("", "configmaps", "get"),
    ("", "configmaps", "create"),
    ("", "services", "get"),
    ("", "services", "create"),
    ("batch", "jobs", "list"),  # kopf
    ("batch", "jobs", "watch"),  # kopf
    ("batch", "jobs", "get"),
    ("batch", "jobs", "create"),
    ("batch", "jobs", "patch"),  # spec.runPolicy suspend/resume, activeDeadlineSeconds
    ("batch", "jobs", "delete"),  # gang restart, onDegraded=Fail on an operator-side rule
    ("", "pods", "list"),  # pre-flight verdict, rank-0 trainer address
    ("", "events", "create"),  # kopf.event()
}
# Granted although the recorded run did not use them: none (the run exercises suspend/resume,
# a gang restart and the TTL deletion, so every verb of controller/kube.py is recorded).
UNEXERCISED: dict[tuple[str, str, str], str] = {}
# With watchNamespaces, kopf also watches namespaces cluster-wide (recorded by
# test_namespaced_operator_reads_only_what_its_roles_grant).
NAMESPACED_CLUSTER_WIDE = {("", "namespaces", "list"), ("", "namespaces", "watch")}
# Not in the ClusterRole on purpose: discovery (GET /api, /apis, /apis/G/V) is a
# non-resource URL every authenticated user may read (the built-in system:discovery role).


def _short(err: Exception) -> str:
    return str(err).split("\n", 1)[0]


def _grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _deployment_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _crd_file(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


# --- lint, schema ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(MATRIX))
def test_helm_lint_strict(case: str) -> None:
    args = template_args(MATRIX[case])
    values_file = args[args.index("-f") + 1]
    out = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, "-f", values_file)
    assert "0 chart(s) failed" in out.stdout


def test_values_schema_rejects_a_wrong_type_naming_the_field() -> None:
    out = helm("template", RELEASE, str(CHART), "--set", "replicas=two", check=False)
    assert out.returncode != 0
    assert "/replicas" in out.stderr and "want integer" in out.stderr, out.stderr


def test_values_schema_rejects_an_unknown_key() -> None:
    out = helm("template", RELEASE, str(CHART), "--set", "monitoring.enable=true", check=False)
    assert out.returncode != 0
    assert "enable" in out.stderr and "additional properties" in out.stderr.lower(), out.stderr


def test_values_schema_covers_every_value() -> None:
    """Every key of values.yaml is in the schema (additionalProperties: false holds)."""
    out = helm("lint", "--strict", str(CHART))
    assert out.returncode == 0


# --- every object validates ----------------------------------------------------------------


@pytest.mark.parametrize("case", list(MATRIX))
def test_rendered_objects_validate(case: str) -> None:
    objs = render(MATRIX[case])
    assert objs, case
    kopf_crds = {
        o["spec"]["names"]["kind"]: o["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for o in by_kind(objs, "CustomResourceDefinition")
        if o["spec"]["group"] == "kopf.dev"
    }
    for obj in objs:
        api = obj["apiVersion"]
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if api.startswith("monitoring.coreos.com/"):
            continue  # prometheus-operator CRDs: see the module docstring
        if api.startswith("kopf.dev/"):
            # a custom resource: kubernetes-validate has no schema; use the kopf CRD's
            jsonschema.validate(obj, kopf_crds[obj["kind"]])
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{case}: {name}: {_short(err)}")
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            assert obj["metadata"].get("namespace") in (NAMESPACE, "team-a", "team-b"), name


def test_every_object_carries_the_chart_labels() -> None:
    for obj in render({}):
        labels = obj["metadata"].get("labels") or {}
        if obj["kind"] == "CustomResourceDefinition" and obj["spec"]["group"] != "kopf.dev":
            continue  # generated from crds/ as is
        assert labels.get("app.kubernetes.io/instance") == RELEASE, obj["kind"]
        assert labels.get("helm.sh/chart", "").startswith("lora-operator-"), obj["kind"]


# --- the CRD ------------------------------------------------------------------------------


def test_chart_crd_is_generated_from_crds_dir() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chart_sync.py"), "--check"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_rendered_crd_equals_crds_dir() -> None:
    rendered = {o["metadata"]["name"]: o for o in by_kind(render({}), "CustomResourceDefinition")}
    assert set(rendered) == {_crd_file(p)["metadata"]["name"] for p in CRD_FILES}
    for path in CRD_FILES:
        want = _crd_file(path)
        got = rendered[want["metadata"]["name"]]
        assert got["metadata"].pop("annotations") == {KEEP: "keep"}
        assert got == want
        dump = {"sort_keys": True, "allow_unicode": True}
        assert yaml.safe_dump(got, **dump).encode() == yaml.safe_dump(want, **dump).encode()


def test_crd_keep_and_off() -> None:
    (crd,) = by_kind(render({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"]
    assert by_kind(render({"crds": {"enabled": False}}), "CustomResourceDefinition") == []


# --- the operator Deployment -------------------------------------------------------------


def test_operator_pod_passes_the_restricted_pod_security_standard() -> None:
    for case in ("defaults", "replicas-2"):
        pod = one(render(MATRIX[case]), "Deployment")["spec"]["template"]
        assert _restricted_violations(pod) == [], case
        container = pod["spec"]["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] == 65532


def test_deployment_args_env_and_probes() -> None:
    values = {
        "trainer": {"image": "registry.example/trainer:1", "imageAllowlist": ["registry.example/"]},
        "health": {"intervalSeconds": 30},
        "metrics": {"port": 9090},
        "image": {"tag": "9.9.9"},
    }
    objs = render(values)
    deploy = one(objs, "Deployment")
    container = _deployment_container(objs)
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert container["image"] == "ghcr.io/lora-operator/operator:9.9.9"
    assert container["args"] == ["--all-namespaces", "--standalone"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {
        "LORA_OPERATOR_NAMESPACES": "",
        "LORA_OPERATOR_TRAINER_IMAGE": "registry.example/trainer:1",
        "LORA_OPERATOR_IMAGE_ALLOWLIST": "registry.example/",
        "LORA_OPERATOR_HEALTH_INTERVAL_SECONDS": "30",
        "LORA_OPERATOR_METRICS_PORT": "9090",
        "LORA_OPERATOR_PEERING": "",
    }
    assert container["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    service = one(objs, "Service")
    assert service["spec"]["ports"][0]["name"] == "metrics"
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    default = _deployment_container(render({}))
    assert default["image"] == "ghcr.io/lora-operator/operator:0.1.0"  # appVersion
    assert "LORA_OPERATOR_TRAINER_IMAGE" not in {e["name"] for e in default["env"]}


def test_service_account() -> None:
    objs = render({"serviceAccount": {"name": "lora", "annotations": {"a": "b"}}})
    sa = one(objs, "ServiceAccount")
    assert (sa["metadata"]["name"], sa["metadata"]["annotations"]) == ("lora", {"a": "b"})
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "lora"
    assert one(objs, "ClusterRoleBinding")["subjects"][0]["name"] == "lora"
    objs = render({"serviceAccount": {"create": False, "name": "existing"}})
    assert by_kind(objs, "ServiceAccount") == []
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


# --- peering -------------------------------------------------------------------------------


def test_replicas_2_turns_on_kopf_peering() -> None:
    objs = render(MATRIX["replicas-2"])
    deploy = one(objs, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    assert "strategy" not in deploy["spec"]
    container = _deployment_container(objs)
    assert container["args"] == ["--all-namespaces", f"--peering={RELEASE}"]
    assert {e["name"]: e["value"] for e in container["env"]}["LORA_OPERATOR_PEERING"] == RELEASE
    crds = {o["metadata"]["name"] for o in by_kind(objs, "CustomResourceDefinition")}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crds
    (peering,) = by_kind(objs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == RELEASE
    assert peering["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    grants = _grants(one(objs, "ClusterRole"))
    assert {("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")} <= (
        grants
    )
    # one replica: no peering at all
    single = render({})
    assert not by_kind(single, "ClusterKopfPeering") and not by_kind(single, "KopfPeering")
    assert not any(g == "kopf.dev" for g, _, _ in _grants(one(single, "ClusterRole")))
    # the kopf CRDs can be left to someone else
    objs = render({"replicas": 2, "peering": {"createCRDs": False}})
    assert not any(
        o["spec"]["group"] == "kopf.dev" for o in by_kind(objs, "CustomResourceDefinition")
    )
    assert len(by_kind(objs, "ClusterKopfPeering")) == 1


def test_replicas_2_namespaced_peers_per_namespace() -> None:
    objs = render(MATRIX["replicas-2-namespaced"])
    peerings = by_kind(objs, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert by_kind(objs, "ClusterKopfPeering") == []
    for role in by_kind(objs, "Role"):
        assert ("kopf.dev", "kopfpeerings", "patch") in _grants(role)
    assert not any(g == "kopf.dev" for g, _, _ in _grants(one(objs, "ClusterRole")))


# --- monitoring ----------------------------------------------------------------------------


def test_monitors_render_only_with_the_prometheus_operator_api() -> None:
    labels = {"release": "kube-prometheus-stack"}
    objs = render({"monitoring": {"releaseLabels": labels}})
    sm, pm = one(objs, "ServiceMonitor"), one(objs, "PodMonitor")
    for obj in (sm, pm):
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert obj["metadata"]["namespace"] == NAMESPACE
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "30s",
                        "honorLabels": True}  # fmt: skip
    service = one(objs, "Service")
    assert sm["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert pm["spec"]["selector"] == {
        "matchLabels": {c.LABEL_MANAGED_BY: c.MANAGED_BY_VALUE, c.LABEL_ROLE: "trainer"}
    }
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert pm["spec"]["podTargetLabels"] == [
        c.LABEL_JOB_NAME, "batch.kubernetes.io/job-completion-index"]  # fmt: skip
    (pod_endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert (pod_endpoint["port"], pod_endpoint["interval"]) == (c.METRICS_PORT_NAME, "15s")
    monitoring = "monitoring.coreos.com/v1"
    for values, api in (({}, False), (MATRIX["monitoring-off"], True)):
        objs = render(values, monitoring_api=api)
        assert not [o for o in objs if o["apiVersion"] == monitoring], (values, api)
    objs = render({"monitoring": {"serviceMonitor": {"enabled": False}}})
    assert by_kind(objs, "ServiceMonitor") == [] and len(by_kind(objs, "PodMonitor")) == 1
    objs = render({"monitoring": {"podMonitor": {"enabled": False}}})
    assert by_kind(objs, "PodMonitor") == [] and len(by_kind(objs, "ServiceMonitor")) == 1


def test_grafana_alerts_on_renders() -> None:
    assert render(MATRIX["grafana-alerts"])


# --- RBAC ----------------------------------------------------------------------------------


def test_clusterrole_grants_the_recorded_set() -> None:
    objs = render({})
    role = one(objs, "ClusterRole")
    assert _grants(role) == RECORDED | set(UNEXERCISED)
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}
    ]
    assert by_kind(objs, "Role") == [] and by_kind(objs, "RoleBinding") == []


def test_namespaced_rbac() -> None:
    objs = render(MATRIX["namespaced"])
    cluster_wide = {
        ("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")
    }
    assert _grants(one(objs, "ClusterRole")) == cluster_wide | NAMESPACED_CLUSTER_WIDE
    roles, bindings = by_kind(objs, "Role"), by_kind(objs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        assert _grants(role) == (RECORDED | set(UNEXERCISED)) - cluster_wide
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": RELEASE}  # fmt: skip
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    container = _deployment_container(objs)
    assert container["args"] == ["--namespace=team-a", "--namespace=team-b", "--standalone"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["LORA_OPERATOR_NAMESPACES"] == "team-a,team-b"
    pm = one(objs, "PodMonitor")
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


@pytest.mark.slow
@pytest.mark.training
async def test_clusterrole_grants_exactly_what_the_operator_used(
    tiny_assets: Any, tmp_path: Path
) -> None:
    """Run the real operator (cluster-wide, standalone, as the chart's defaults run it) on
    the local cluster through a pre-flight, a suspended job resumed, a short training, its
    TTL deletion and a failing job's gang restart; every request its clients made must be
    granted, and every grant used."""
    from lora_operator.controller.settings import OperatorConfig
    from lora_operator.dev.cluster import dev_cluster
    from tests.e2e.cluster import Cluster, quickstart, until

    config = OperatorConfig(
        "ignored:0.1", (), watch_timeout_seconds=5, health_interval_seconds=2.0,
        health_timeout_seconds=2.0, metrics_port=None,
    )  # fmt: skip
    assert config.cluster_wide and config.peering is None
    tiny = Path(tiny_assets.model_dir).parent
    # created suspended, then resumed (Job patch); deleted by its TTL (LoRAFineTune delete)
    patch = {
        "training": {"maxSteps": 10},
        "health": {"preflight": {"enabled": True}},
        "runPolicy": {"suspend": True, "ttlSecondsAfterFinished": 0},
    }
    manifest = quickstart(tiny, tmp_path / "run", patch)
    # its data file is missing: the pod fails, the gang restarts once (Job delete), then Failed
    broken = quickstart(tiny, tmp_path / "broken", {
        "dataset": {"source": f"file://{tmp_path / 'missing.jsonl'}"},
        "health": {"preflight": {"enabled": False}},
        "runPolicy": {"backoffLimit": 1},
    }).replace("name: quickstart", "name: broken")  # fmt: skip
    async with dev_cluster(tmp_path / "state", config, cls=Cluster) as cluster:
        await cluster.kubectl("apply", "--validate=false", "-f", "-", stdin=manifest)
        await cluster.kubectl("apply", "--validate=false", "-f", "-", stdin=broken)

        async def phase_of(name: str, *phases: str) -> Any:
            phase = ((await cluster.lft(name)) or {}).get("status", {}).get("phase")
            return phase if phase in phases else None

        assert await until(lambda: phase_of("quickstart", c.PHASE_SUSPENDED), timeout=120)
        await cluster.kubectl("patch", "lft", "quickstart", "--type=merge",
                              "-p", '{"spec":{"runPolicy":{"suspend":false}}}')  # fmt: skip

        async def gone() -> bool:  # Succeeded, then deleted by the operator (TTL 0)
            return await cluster.lft("quickstart") is None

        await until(gone, timeout=300)
        failed = await until(lambda: phase_of("broken", c.PHASE_FAILED), timeout=300)
        assert failed == c.PHASE_FAILED
        assert (await cluster.lft("broken"))["status"]["restarts"] == 1
        await asyncio.sleep(1.0)  # kopf sees the DELETED event
        await cluster.stop_operator()
        log = list(cluster.api.log)

    agents = {r.user_agent.split("/", 1)[0] for r in log if r.resource}
    assert {"kopf", "OpenAPI-Generator", "lora-operator-local", "kubectl"} <= agents, agents
    used = {(g, r, v) for _, g, r, v in _operator_requests(log)}
    granted = _grants(one(render({}), "ClusterRole"))
    assert used - granted == set(), "used but not granted"
    assert granted - used == set(UNEXERCISED), "granted but never used"
    assert used == RECORDED


def _operator_requests(log: list[Any]) -> set[tuple[str | None, str, str, str]]:
    """(namespace, apiGroup, resource[/subresource], verb) of the operator's own requests.

    The operator's two clients: kopf (aiohttp, "kopf/<version>") and the kubernetes client
    ("OpenAPI-Generator/<version>/python"); the test's client and the pod runner say
    "lora-operator-local", kubectl "kubectl/...". Discovery (GET /api, /apis, /apis/G/V: no
    resource) is a non-resource URL every authenticated user may read (system:discovery).
    """
    used = set()
    for r in log:
        if not r.resource or not r.user_agent.startswith(("kopf/", "OpenAPI-Generator/")):
            continue
        group = "" if r.path.startswith("/api/") else r.path.split("/")[2]
        resource = r.resource + (f"/{r.subresource}" if r.subresource else "")
        used.add((r.namespace, group, resource, r.verb))
    return used


@pytest.mark.slow
async def test_namespaced_operator_reads_only_what_its_roles_grant(tmp_path: Path) -> None:
    """kopf with a namespace list (watchNamespaces): start it, let it watch, stop it; its
    cluster-wide requests are exactly the namespaced ClusterRole, the others in the Role."""
    from lora_operator.controller.settings import OperatorConfig
    from lora_operator.dev.cluster import dev_cluster
    from tests.e2e.cluster import until

    config = OperatorConfig("ignored:0.1", ("default",), watch_timeout_seconds=5,
                            metrics_port=None)  # fmt: skip
    objs = render({"watchNamespaces": ["default"]})
    granted = _grants(one(objs, "ClusterRole"))

    def cluster_wide(used: set[tuple[str | None, str, str, str]]) -> set[tuple[str, str, str]]:
        return {(g, r, v) for ns, g, r, v in used if ns is None}

    async with dev_cluster(tmp_path / "state", config) as cluster:

        async def watching() -> bool:  # kopf is ready before its first list and watch
            return cluster_wide(_operator_requests(list(cluster.api.log))) >= granted

        try:
            await until(watching, timeout=30)
        finally:
            await cluster.stop_operator()
        used = _operator_requests(list(cluster.api.log))
    assert cluster_wide(used) == granted
    assert {(g, r, v) for ns, g, r, v in used if ns == "default"} <= _grants(one(objs, "Role"))
