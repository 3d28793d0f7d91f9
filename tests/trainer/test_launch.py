"""`lora-train launch`: golden launcher commands, env errors, and real torchrun/deepspeed runs.

The real runs start the wrapper as a subprocess over 2 CPU ranks of a small probe module
(instead of lora_trainer) and check the pod's exit code, which the Job's podFailurePolicy reads.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lora_operator.api.constants import EXIT_HEALTH_STOP
from lora_operator.local.ports import free_port
from lora_trainer.launch import exit_code, main, mark_health_stop
from lora_trainer.launch_env import (
    LaunchArgs,
    LaunchError,
    LaunchPlan,
    build_command,
    hostfile_text,
    plan_from_env,
    redact,
)

PROBE = """
import os, signal, sys, time
from pathlib import Path
from lora_trainer.launch import mark_health_stop

def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    (out / f"started.{rank}").write_text(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""))
    if mode == "ok":
        return 0
    if mode == "sleep":
        def on_term(signum, frame):
            (out / f"sigterm.{rank}").write_text("checkpointed")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        (out / f"ready.{rank}").write_text("")
        time.sleep(60)
        return 1
    if rank == 1:
        if mode == "health":
            mark_health_stop("LoRAGradientCollapse")
            return 86
        return 3  # mode == "crash"
    time.sleep(30)  # rank 0 blocks, as in a collective, until the launcher stops it
    return 0

sys.exit(main())
"""
LAUNCH = "import sys; from lora_trainer.launch import main; sys.exit(main(sys.argv[1:]))"
RUN_TIMEOUT = 45


def plan(**overrides: object) -> LaunchPlan:
    base: dict[str, object] = {
        "launcher": "torchrun",
        "nnodes": 1,
        "nproc_per_node": 8,
        "node_rank": 0,
        "master_addr": "127.0.0.1",
        "master_port": 29500,
        "args": ("--config", "/etc/lora/train.yaml"),
        "python": "python",
    }
    base.update(overrides)
    return LaunchPlan(**base)  # type: ignore[arg-type]


# --- build_command golden cases -------------------------------------------------------------


def test_torchrun_single_node_is_standalone() -> None:
    assert shlex.join(build_command(plan())) == (
        "python -m torch.distributed.run --nnodes 1 --nproc-per-node 8 --standalone "
        "--max-restarts 0 -m lora_trainer --config /etc/lora/train.yaml"
    )


def test_torchrun_multi_node_uses_static_rendezvous_at_pod_0() -> None:
    """Static: pod index 0 holds global rank 0 (c10d would rank pods by arrival)."""
    cmd = build_command(plan(nnodes=2, node_rank=1, master_addr="ft-0.ft"))
    assert shlex.join(cmd) == (
        "python -m torch.distributed.run --nnodes 2 --nproc-per-node 8 --node-rank 1 "
        "--rdzv-backend static --master-addr ft-0.ft --master-port 29500 "
        "--max-restarts 0 -m lora_trainer --config /etc/lora/train.yaml"
    )


def test_deepspeed_launcher_runs_without_ssh_from_a_hostfile() -> None:
    p = plan(launcher="deepspeed", nnodes=2, node_rank=1, master_addr="ft-0.ft", hostfile="/h")
    assert shlex.join(build_command(p)) == (
        "python -m deepspeed.launcher.runner --hostfile /h --no_ssh --node_rank 1 "
        "--num_nodes 2 --num_gpus 8 --master_addr ft-0.ft --master_port 29500 "
        "--no_local_rank --module lora_trainer --config /etc/lora/train.yaml"
    )
    assert hostfile_text(p) == "node-0 slots=8\nnode-1 slots=8\n"


def test_logged_command_masks_secret_looking_flags() -> None:
    cmd = ["x", "--hf-token", "abc", "--api-key=def", "--lr", "1e-4"]
    assert redact(cmd) == ["x", "--hf-token", "***", "--api-key=***", "--lr", "1e-4"]


# --- plan_from_env ------------------------------------------------------------------------


POD_ENV = {
    "JOB_COMPLETION_INDEX": "1",
    "LORA_NNODES": "2",
    "LORA_NPROC_PER_NODE": "8",
    "LORA_MASTER_ADDR": "ft-0.ft",
}


def test_plan_from_the_operators_pod_environment() -> None:
    p = plan_from_env(LaunchArgs(trainer_args=("--x",)), POD_ENV)
    assert (p.launcher, p.nnodes, p.nproc_per_node, p.node_rank) == ("torchrun", 2, 8, 1)
    assert (p.master_addr, p.master_port, p.args) == ("ft-0.ft", 29500, ("--x",))


def test_flags_override_the_environment() -> None:
    args = LaunchArgs(launcher="deepspeed", nproc_per_node="2", node_rank="0", master_port="1234")
    p = plan_from_env(args, POD_ENV)
    assert (p.launcher, p.nproc_per_node, p.node_rank, p.master_port) == ("deepspeed", 2, 0, 1234)


@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({**POD_ENV, "LORA_NPROC_PER_NODE": ""}, LaunchArgs(), "--nproc-per-node"),
        ({**POD_ENV, "LORA_NPROC_PER_NODE": "eight"}, LaunchArgs(), "LORA_NPROC_PER_NODE"),
        ({**POD_ENV, "LORA_NNODES": "0"}, LaunchArgs(), "LORA_NNODES"),
        ({**POD_ENV, "JOB_COMPLETION_INDEX": "2"}, LaunchArgs(), "JOB_COMPLETION_INDEX"),
        (
            {k: v for k, v in POD_ENV.items() if k != "JOB_COMPLETION_INDEX"},
            LaunchArgs(),
            "JOB_COMPLETION_INDEX",
        ),
        ({**POD_ENV, "LORA_MASTER_ADDR": ""}, LaunchArgs(), "LORA_MASTER_ADDR"),
        ({**POD_ENV, "LORA_MASTER_PORT": "70000"}, LaunchArgs(), "LORA_MASTER_PORT"),
        (POD_ENV, LaunchArgs(launcher="mpirun"), "--launcher"),
    ],
)
def test_invalid_settings_name_the_flag_or_variable(
    env: dict[str, str], args: LaunchArgs, named: str
) -> None:
    with pytest.raises(LaunchError, match=named):
        plan_from_env(args, env)


def test_usage_errors_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LORA_NPROC_PER_NODE", raising=False)
    assert main(["--", "--config", "x.yaml"]) == 2
    assert "--nproc-per-node is required (or set $LORA_NPROC_PER_NODE)" in capsys.readouterr().err
    assert main(["--launcher", "mpirun"]) == 2


# --- exit-code mapping and the health-stop marker -----------------------------------------


def test_exit_code_mapping(tmp_path: Path) -> None:
    assert exit_code(0, tmp_path) == 0
    assert exit_code(1, tmp_path) == 1
    assert exit_code(-signal.SIGKILL, tmp_path) == 128 + signal.SIGKILL
    assert exit_code(1, tmp_path, forwarded=signal.SIGTERM) == 143
    (tmp_path / "health-stop.3").write_text('{"reason": "NonFinite"}')
    assert exit_code(1, tmp_path) == EXIT_HEALTH_STOP == 86
    assert exit_code(0, tmp_path) == 0  # the launcher succeeded: a stray marker is ignored


def test_mark_health_stop_writes_the_ranks_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORA_TRAINER_STATUS_DIR", raising=False)
    mark_health_stop("NonFinite")  # outside the wrapper: a no-op
    monkeypatch.setenv("LORA_TRAINER_STATUS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "5")
    mark_health_stop("NonFinite: loss is nan at step 12")
    assert [p.name for p in tmp_path.iterdir()] == ["health-stop.5"]
    assert "loss is nan" in (tmp_path / "health-stop.5").read_text()


# --- real launches over 2 CPU ranks -------------------------------------------------------


@pytest.fixture
def probe_env(tmp_path: Path) -> dict[str, str]:
    """The pod environment with the probe module importable (PYTHONPATH) and no pod vars."""
    pkg = tmp_path / "probe"
    pkg.mkdir()
    (pkg / "launch_probe.py").write_text(textwrap.dedent(PROBE))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORA_", "JOB_COMP"))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pkg), env.get("PYTHONPATH")]))
    return env


def launch_cmd(out: Path, mode: str, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        LAUNCH,
        "--nproc-per-node",
        "2",
        "--module",
        "launch_probe",
        *flags,
        "--",
        mode,
        str(out),
    ]


def launch(
    env: dict[str, str], out: Path, mode: str, *flags: str
) -> subprocess.CompletedProcess[str]:
    out.mkdir(exist_ok=True)
    return subprocess.run(
        launch_cmd(out, mode, *flags),
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


@pytest.mark.slow
def test_both_ranks_succeed_exit_0(probe_env: dict[str, str], tmp_path: Path) -> None:
    result = launch(probe_env, tmp_path / "out", "ok")
    assert result.returncode == 0, result.stderr
    assert "running: " in result.stderr and "--standalone" in result.stderr
    prom_dirs = {(tmp_path / "out" / f"started.{r}").read_text() for r in (0, 1)}
    assert len(prom_dirs) == 1 and prom_dirs.pop().endswith("prometheus")  # fresh, shared


@pytest.mark.slow
def test_health_stop_on_one_rank_exits_86_where_torchrun_exits_1(
    probe_env: dict[str, str], tmp_path: Path
) -> None:
    result = launch(probe_env, tmp_path / "out", "health")
    assert result.returncode == EXIT_HEALTH_STOP, result.stderr
    assert "rank 1 stopped on the health policy: LoRAGradientCollapse" in result.stderr
    # Plain torchrun, same ranks and the same marker directory: the 86 is lost.
    status = tmp_path / "status"
    status.mkdir()
    plain = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "launch_probe",
            "health",
            str(tmp_path / "out"),
        ],
        env={**probe_env, "LORA_TRAINER_STATUS_DIR": str(status)},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert plain.returncode == 1
    assert (status / "health-stop.1").exists()


@pytest.mark.slow
def test_a_crashing_rank_fails_the_pod_without_claiming_a_health_stop(
    probe_env: dict[str, str], tmp_path: Path
) -> None:
    result = launch(probe_env, tmp_path / "out", "crash")
    assert result.returncode not in (0, EXIT_HEALTH_STOP), result.stderr
    assert "exitcode  : 3" in result.stderr


@pytest.mark.slow
def test_sigterm_reaches_the_ranks_and_the_wrapper_exits(
    probe_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        launch_cmd(out, "sleep"),
        env=probe_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not all((out / f"ready.{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(p.name for p in out.glob("sigterm.*")) == ["sigterm.0", "sigterm.1"]
    assert rc == 128 + signal.SIGTERM


@pytest.mark.slow
def test_deepspeed_launcher_on_cpu_keeps_the_health_stop(
    probe_env: dict[str, str], tmp_path: Path
) -> None:
    result = launch(probe_env, tmp_path / "out", "health", "--launcher", "deepspeed")
    assert result.returncode == EXIT_HEALTH_STOP, result.stderr
    assert "deepspeed.launcher.runner --hostfile" in result.stderr


@pytest.mark.slow
def test_two_pods_meet_at_pod_0_through_the_operators_env(
    probe_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    pod_env = {
        "LORA_NNODES": "2",
        "LORA_NPROC_PER_NODE": "1",
        "LORA_MASTER_ADDR": "127.0.0.1",
        "LORA_MASTER_PORT": str(free_port()),
    }
    cmd = [sys.executable, "-c", LAUNCH, "--module", "launch_probe", "--", "ok", str(out)]
    pods = [
        subprocess.Popen(
            cmd,
            env={**probe_env, **pod_env, "JOB_COMPLETION_INDEX": str(i)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    results = [pod.communicate(timeout=RUN_TIMEOUT) for pod in pods]
    assert [pod.returncode for pod in pods] == [0, 0], results
    assert sorted(p.name for p in out.glob("started.*")) == ["started.0", "started.1"]
