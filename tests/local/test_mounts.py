"""A container's view of its volume mounts on the local runner: what a real container sees
under its own root, the directories above its mountPaths included.

Reference: the Volumes page (https://kubernetes.io/docs/concepts/storage/volumes/: each
container mounts each volume at its mountPath in the container's filesystem; subPath mounts
a sub-directory). The operator's training pod mounts claim CLAIM at /mnt/pvc/CLAIM and sets
LORA_PVC_ROOT=/mnt/pvc; the trainer composes /mnt/pvc/CLAIM/PATH from that at run time.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_operator.local.podproc import Network, container_root, make_rewriter
from tests.local import test_runner
from tests.local.test_runner import JOBS, Cluster, condition, finished

cluster = test_runner.cluster  # the fixture: an API server and a pod runner


def test_directories_above_mount_paths_resolve_to_the_mounts(tmp_path: Path) -> None:
    """$LORA_PVC_ROOT=/mnt/pvc (no mountPath itself) must lead to the claims mounted below it."""
    data, out, tmp = (tmp_path / "vol" / v for v in ("data", "out", "tmp"))
    for volume in (data, out, tmp):
        volume.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"text": "hi"}\n')
    mounts = {"/mnt/pvc/data": str(data), "/mnt/pvc/out": str(out), "/tmp": str(tmp)}
    rootfs = tmp_path / "rootfs"
    paths = container_root(mounts, rootfs)
    rewrite = make_rewriter(paths, "default", None, Network(tmp_path / "hosts"))

    pvc_root = Path(rewrite("/mnt/pvc"))
    assert pvc_root == rootfs / "mnt" / "pvc"
    assert (pvc_root / "data" / "train.jsonl").read_text() == '{"text": "hi"}\n'
    (pvc_root / "out" / "run").mkdir()  # the trainer's output lands in the claim's volume
    assert (out / "run").is_dir()
    assert sorted(p.name for p in pvc_root.iterdir()) == ["data", "out"]
    assert rewrite("/mnt") == str(rootfs / "mnt")
    # a mountPath still maps straight to its volume, paths below it too
    assert rewrite("/mnt/pvc/data/train.jsonl") == f"{data}/train.jsonl"
    # a claim that is not mounted is not there, as in a container
    assert not Path(rewrite("/mnt/pvc/other/x")).exists()
    assert rewrite("/mnt/pvcs") == str(rootfs / "mnt" / "pvcs")  # a sibling, not the claims


def test_host_paths_and_nested_mounts(tmp_path: Path) -> None:
    """Paths below a directory above a mount that exist on this machine (/dev/null next to
    /dev/shm) stay host paths; a mount inside another mount is rewritten but not linked into
    the outer volume."""
    outer, inner, shm = (tmp_path / "vol" / v for v in ("outer", "inner", "shm"))
    for volume in (outer, inner, shm):
        volume.mkdir(parents=True)
    mounts = {"/data": str(outer), "/data/cache": str(inner), "/dev/shm": str(shm)}
    rootfs = tmp_path / "rootfs"
    paths = container_root(mounts, rootfs)
    rewrite = make_rewriter(paths, "default", None, Network(tmp_path / "hosts"))

    assert rewrite("/dev/null") == "/dev/null"
    assert rewrite("/dev") == str(rootfs / "dev")
    assert (rootfs / "dev" / "shm").resolve() == shm.resolve()
    assert rewrite("/data/cache/x") == f"{inner}/x"
    assert rewrite("/data/y") == f"{outer}/y"
    assert not (outer / "cache").exists()  # nothing written into the outer volume
    assert container_root(mounts, rootfs) == paths  # a second start of the pod: same links


# Run by a pod of the operator's own Job (builders): the trainer's own URI resolution
# (lora_trainer.config.resolve_uri, reading LORA_PVC_ROOT at run time) on the spec's URIs.
READ_PVC = """
    import json, sys
    from lora_trainer.config import resolve_uri
    spec = json.load(open(sys.argv[sys.argv.index("--spec") + 1]))["spec"]
    line = resolve_uri(spec["dataset"]["source"]).read_text().splitlines()[0]
    out = resolve_uri(spec["output"]["uri"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "seen.txt").write_text(line)
    print("read", line)
"""


async def test_pvc_uris_resolve_in_the_operators_pod(
    cluster: Cluster, make_body: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    from lora_operator.builders import Owner, build_indexed_job, build_spec_configmap
    from lora_operator.validation import validate_body

    patch = {
        "dataset": {"source": "pvc://data/train.jsonl", "evalSource": "pvc://data/eval.jsonl"},
        "output": {"uri": "pvc://out/run"},
    }
    result = validate_body(make_body({"spec": patch}))
    assert result.resource is not None, result.problems
    owner = Owner("pvcjob", "default", "uid-of-the-lorafinetune")
    configmap = build_spec_configmap(result.resource.spec, owner)
    job = build_indexed_job(result.resource.spec, owner, "ignored:0.1")
    for child in (configmap, job):
        child["metadata"].pop("ownerReferences")  # no LoRAFineTune here for GC to follow
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LORA_PVC_ROOT"] == "/mnt/pvc"
    assert "/mnt/pvc" not in {m["mountPath"] for m in container["volumeMounts"]}
    container["command"] = [sys.executable, "-c", textwrap.dedent(READ_PVC),
                            *container["command"][2:]]  # fmt: skip
    container["name"] = "main"
    claims = cluster.runner.state / "pvcs" / "default"
    (claims / "data").mkdir(parents=True)
    (claims / "data" / "train.jsonl").write_text('{"text": "from the claim"}\n')
    await cluster.client.create("/api/v1/namespaces/default/configmaps", configmap)
    await cluster.client.create(JOBS, job)
    done = await finished(cluster, "pvcjob")
    (pod,) = await cluster.pods("pvcjob")
    assert condition(done, "Complete"), cluster.log(pod)
    assert (claims / "out" / "run" / "seen.txt").read_text() == '{"text": "from the claim"}'
