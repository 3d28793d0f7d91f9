"""`lora-train launch`: a thin wrapper over torchrun / the deepspeed launcher, run by every pod.

    lora-train launch [--launcher torchrun|deepspeed] [--nnodes N] [--nproc-per-node P]
                      [--node-rank R] [--master-addr A] [--master-port P] -- TRAINER_ARGS...

Why a wrapper: torchrun exits 1 whenever a worker fails, so a rank's exit 86
(EXIT_HEALTH_STOP, which the Job's podFailurePolicy maps to FailJob) would be lost. Each rank
that stops on the health policy calls `mark_health_stop(reason)` before exiting 86; that
drops a file into a status directory this wrapper created and passed down as
`$LORA_TRAINER_STATUS_DIR`, and the wrapper then exits 86 itself.

The wrapper also gives prometheus_client's multiprocess mode a fresh `$PROMETHEUS_MULTIPROC_DIR`
(the pod's, wiped, or one under the status directory), starts the launcher in its own process
group and forwards SIGTERM/SIGINT to that group so the ranks can checkpoint before exiting.
Exit codes: 0 when the launcher succeeded; else 86 when a rank marked a health stop; else
128+n when the wrapper forwarded signal n; else the launcher's code (killed by signal n:
128+n); 2 for usage errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType

from lora_operator.api.constants import EXIT_HEALTH_STOP, EXIT_USAGE

from .launch_env import (
    DEFAULT_MODULE,
    LaunchArgs,
    LaunchError,
    LaunchPlan,
    build_command,
    hostfile_text,
    plan_from_env,
    redact,
)

ENV_STATUS_DIR = "LORA_TRAINER_STATUS_DIR"
ENV_PROM_DIR = "PROMETHEUS_MULTIPROC_DIR"
HEALTH_STOP_PREFIX = "health-stop."
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)

__all__ = [
    "LaunchArgs",
    "LaunchError",
    "LaunchPlan",
    "build_command",
    "health_stops",
    "main",
    "mark_health_stop",
    "plan_from_env",
]


def mark_health_stop(reason: str) -> None:
    """Record that this rank stops on the health policy; call it just before `exit(86)`.

    Writes `health-stop.<RANK>` (JSON: rank, local_rank, pid, time, reason) atomically into
    `$LORA_TRAINER_STATUS_DIR`. Outside `lora-train launch` (no such variable) it does nothing:
    the rank's own exit 86 is then the pod's exit code.
    """
    status_dir = os.environ.get(ENV_STATUS_DIR)
    if not status_dir:
        return
    rank = os.environ.get("RANK", "0")
    record = {
        "rank": rank,
        "local_rank": os.environ.get("LOCAL_RANK"),
        "pid": os.getpid(),
        "time": time.time(),
        "reason": reason,
    }
    path = Path(status_dir) / f"{HEALTH_STOP_PREFIX}{rank}"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


def health_stops(status_dir: Path) -> list[dict[str, object]]:
    """The health-stop records the local ranks left in status_dir, ordered by file name."""
    records: list[dict[str, object]] = []
    for path in sorted(status_dir.glob(f"{HEALTH_STOP_PREFIX}*")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            records.append({"file": path.name, "reason": "unreadable health-stop record"})
    return records


def exit_code(launcher_rc: int, status_dir: Path, forwarded: int | None = None) -> int:
    """The pod's exit code from the launcher's return code (negative: killed by a signal).

    86 if the launcher failed and a rank marked a health stop; else 128+n if we forwarded
    signal n and the launcher failed (torchrun exits 1 after a SIGTERM); else its code.
    """
    rc = 128 - launcher_rc if launcher_rc < 0 else launcher_rc
    if rc == 0:
        return 0
    if health_stops(status_dir):
        return EXIT_HEALTH_STOP
    return 128 + forwarded if forwarded is not None else rc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-train launch",
        description="Start this pod's training ranks under torchrun or the deepspeed launcher.",
        epilog="Arguments after `--` go to every rank (`python -m lora_trainer ARGS`).",
    )
    parser.add_argument(
        "--launcher",
        choices=("torchrun", "deepspeed"),
        default=None,
        help="default: $LORA_LAUNCHER or torchrun",
    )
    parser.add_argument("--nnodes", help="pods in the gang (default: $LORA_NNODES or 1)")
    parser.add_argument("--nproc-per-node", help="ranks in this pod ($LORA_NPROC_PER_NODE)")
    parser.add_argument("--node-rank", help="this pod's index ($JOB_COMPLETION_INDEX)")
    parser.add_argument("--master-addr", help="pod 0's host name ($LORA_MASTER_ADDR)")
    parser.add_argument("--master-port", help="rendezvous port ($LORA_MASTER_PORT or 29500)")
    # Hidden: tests run a small rank program instead of the trainer.
    parser.add_argument("--module", default=DEFAULT_MODULE, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str]) -> LaunchArgs:
    """Flags before `--` are the wrapper's; everything after goes to the ranks."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    ns = _parser().parse_args(argv[:split])
    return LaunchArgs(
        launcher=ns.launcher,
        nnodes=ns.nnodes,
        nproc_per_node=ns.nproc_per_node,
        node_rank=ns.node_rank,
        master_addr=ns.master_addr,
        master_port=ns.master_port,
        module=ns.module,
        trainer_args=tuple(argv[split + 1 :]),
    )


def _fresh_dir(path: Path) -> None:
    """Create path, or empty it if it exists (it may be an emptyDir mount: keep the dir)."""
    path.mkdir(parents=True, exist_ok=True)
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def prepare_env(env: Mapping[str, str], status_dir: Path) -> dict[str, str]:
    """The ranks' environment: the status dir and a fresh prometheus multiprocess dir."""
    child_env = dict(env)
    prom_dir = Path(env.get(ENV_PROM_DIR) or status_dir / "prometheus")
    _fresh_dir(prom_dir)
    child_env[ENV_STATUS_DIR] = str(status_dir)
    child_env[ENV_PROM_DIR] = str(prom_dir)
    return child_env


def _log(message: str) -> None:
    print(f"lora-train launch: {message}", file=sys.stderr, flush=True)


def run_launcher(cmd: list[str], env: Mapping[str, str]) -> tuple[int, int | None]:
    """Run cmd in its own process group, forwarding SIGTERM/SIGINT to the group.

    Returns cmd's return code and the first signal forwarded (None if none was).
    """
    proc: subprocess.Popen[bytes] | None = None
    received: list[int] = []
    unsent: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if proc is None:  # not started yet: forwarded right after Popen
            unsent.append(signum)
            return
        _log(f"forwarding {signal.Signals(signum).name} to the ranks")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        proc = subprocess.Popen(cmd, env=dict(env), process_group=0)
        for signum in unsent:
            os.killpg(proc.pid, signum)
        return proc.wait(), (received[0] if received else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch(plan: LaunchPlan, env: Mapping[str, str]) -> int:
    """Run plan to completion with a fresh status directory; the pod's exit code."""
    status_dir = Path(tempfile.mkdtemp(prefix="lora-launch-"))
    try:
        child_env = prepare_env(env, status_dir)
        if plan.launcher == "deepspeed":
            hostfile = status_dir / "hostfile"
            hostfile.write_text(hostfile_text(plan))
            plan = replace(plan, hostfile=str(hostfile))
        cmd = build_command(plan)
        _log(f"running: {shlex.join(redact(cmd))}")
        rc, forwarded = run_launcher(cmd, child_env)
        code = exit_code(rc, status_dir, forwarded)
        for record in health_stops(status_dir):
            _log(f"rank {record.get('rank')} stopped on the health policy: {record.get('reason')}")
        _log(f"launcher exited {rc}; exiting {code}")
        return code
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """`lora-train launch ...`; returns the exit code (2 for usage errors)."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        plan = plan_from_env(args, os.environ)
    except LaunchError as exc:
        _log(f"error: {exc}")
        return EXIT_USAGE
    return launch(plan, os.environ)


if __name__ == "__main__":
    sys.exit(main())
