"""`lora-operator dev` as a user drives it: their own kubectl against the printed KUBECONFIG;
apply, get with printer columns, describe with Events, wait, delete with the children
garbage-collected, Ctrl-C with a job still training leaves no process behind."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from lora_operator.local.podrunner import signal_tree
from tests.e2e.cluster import KUBECTL, ROOT, quickstart

pytestmark = [pytest.mark.slow, pytest.mark.training]
LORA_OPERATOR = ROOT / ".venv" / "bin" / "lora-operator"


def descendants(pid: int) -> set[int]:
    """PIDs below PID (by /proc ppid links)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        kids = {p for p, pp in parents.items() if pp == parent} - found
        found |= kids
        frontier.extend(kids)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_dev_mode_with_real_kubectl(tiny_assets: Any, tmp_path: Path) -> None:
    state, kubeconfig = tmp_path / "dev", tmp_path / "kubeconfig"
    proc = subprocess.Popen(
        [str(LORA_OPERATOR), "dev", "--state-dir", str(state), "--kubeconfig", str(kubeconfig),
         "--health-interval", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    env = {"PATH": "/usr/bin"}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("export KUBECACHEDIR="):
                break
            assert line, "".join(lines)
        exports = dict(
            ln.removeprefix("export ").strip().split("=", 1)
            for ln in lines
            if ln.startswith("export ")
        )
        assert exports["KUBECONFIG"] == str(kubeconfig)
        env |= exports

        def kubectl(*args: str, stdin: str | None = None) -> str:
            out = subprocess.run([str(KUBECTL), *args], env=env, input=stdin, text=True,
                                 capture_output=True, timeout=300)  # fmt: skip
            assert out.returncode == 0, (args, out.stderr)
            return out.stdout

        tiny = Path(tiny_assets.model_dir).parent
        no_preflight = {"health": {"preflight": {"enabled": False}}}
        manifest = quickstart(tiny, tmp_path / "run", no_preflight)
        assert "lorafinetune.lora-operator.dev/quickstart created" in kubectl(
            "apply", "--validate=false", "-f", "-", stdin=manifest
        )
        kubectl("wait", "--for=condition=Succeeded", "lft/quickstart", "--timeout=240s")
        header, row = kubectl("get", "lft").splitlines()
        assert header.split() == ["NAME", "PHASE", "HEALTH", "STEP", "LOSS", "AGE"]
        assert row.split()[:4] == ["quickstart", "Succeeded", "Healthy", "40"], row
        wide = kubectl("get", "lft", "-o", "wide").splitlines()[0].split()
        assert "PROGRESS" in wide and "EVAL-LOSS" in wide
        assert "TOKENS/S" in wide and "ETA-S" in wide
        described = kubectl("describe", "lft", "quickstart")
        assert "Events:" in described and "Created" in described and "Succeeded" in described
        children = json.loads(kubectl("get", "jobs,configmaps,services", "-o", "json"))
        assert len(children["items"]) == 3, [i["metadata"]["name"] for i in children["items"]]

        kubectl("delete", "lft", "quickstart")
        deadline = time.monotonic() + 30
        while json.loads(kubectl("get", "jobs,configmaps,services,pods", "-o", "json"))["items"]:
            assert time.monotonic() < deadline, "children not garbage-collected"
            time.sleep(0.5)

        # a job still training when the user presses Ctrl-C
        long = quickstart(tiny, tmp_path / "long", no_preflight | {"training": {"maxSteps": 5000}})
        kubectl("apply", "--validate=false", "-f", "-", stdin=long.replace("quickstart", "long"))
        deadline = time.monotonic() + 120
        while not kubectl("get", "lft", "long", "-o", "jsonpath={.status.progress.step}"):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        tree = descendants(proc.pid)
        assert len(tree) >= 3, "the trainer's processes run below dev"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, "".join(lines) + rest
        assert "Stopped" in rest
        deadline = time.monotonic() + 15  # the workers' exits may trail dev's own
        while [p for p in tree if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in tree if alive(p)], "processes left behind"
    finally:
        if proc.poll() is None:
            signal_tree(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
