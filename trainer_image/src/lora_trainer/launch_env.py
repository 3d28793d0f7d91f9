"""The pure half of `lora-train launch`: the pod's settings -> a LaunchPlan -> a command line.

The operator's Indexed Job sets, per pod: `JOB_COMPLETION_INDEX` (node rank), `LORA_NNODES`,
`LORA_NPROC_PER_NODE`, `LORA_MASTER_ADDR` (pod 0's stable hostname `NAME-0.SERVICE`),
and `LORA_MASTER_PORT` (torchrun's static rendezvous there: pod index 0 holds global rank
0). Flags override the environment.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Launcher = Literal["torchrun", "deepspeed"]
LAUNCHERS: tuple[Launcher, ...] = ("torchrun", "deepspeed")
DEFAULT_MODULE = "lora_trainer"
DEFAULT_MASTER_PORT = 29500

ENV_NNODES = "LORA_NNODES"
ENV_NPROC = "LORA_NPROC_PER_NODE"
ENV_NODE_RANK = "JOB_COMPLETION_INDEX"
ENV_MASTER_ADDR = "LORA_MASTER_ADDR"
ENV_MASTER_PORT = "LORA_MASTER_PORT"
ENV_LAUNCHER = "LORA_LAUNCHER"


class LaunchError(ValueError):
    """A missing or invalid launch setting; the message names the flag and the variable."""


@dataclass(frozen=True)
class LaunchArgs:
    """`lora-train launch` flags as given (None: not given, fall back to the environment)."""

    launcher: str | None = None
    nnodes: str | None = None
    nproc_per_node: str | None = None
    node_rank: str | None = None
    master_addr: str | None = None
    master_port: str | None = None
    module: str = DEFAULT_MODULE
    trainer_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class LaunchPlan:
    """Everything one pod's launcher needs; build_command turns it into argv."""

    launcher: Launcher
    nnodes: int
    nproc_per_node: int
    node_rank: int
    master_addr: str
    master_port: int
    module: str = DEFAULT_MODULE
    args: tuple[str, ...] = ()
    python: str = field(default_factory=lambda: sys.executable)
    # deepspeed only: `--no_ssh` needs a hostfile listing every node (see hostfile_text).
    hostfile: str = ""


def world_size() -> int:
    """How many ranks the launcher (torchrun, deepspeed) started this process among (1 when
    it runs alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _setting(flag_value: str | None, env: Mapping[str, str], var: str) -> str | None:
    if flag_value is not None:
        return flag_value
    value = env.get(var, "").strip()
    return value or None


def _int_setting(raw: str | None, flag: str, var: str, minimum: int) -> int:
    if raw is None:
        raise LaunchError(f"{flag} is required (or set ${var})")
    try:
        value = int(raw)
    except ValueError:
        raise LaunchError(f"{flag} / ${var} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise LaunchError(f"{flag} / ${var} must be >= {minimum}, got {value}")
    return value


def _launcher(args: LaunchArgs, env: Mapping[str, str]) -> Launcher:
    raw = _setting(args.launcher, env, ENV_LAUNCHER) or "torchrun"
    for name in LAUNCHERS:
        if raw == name:
            return name
    raise LaunchError(f"--launcher / ${ENV_LAUNCHER} must be torchrun or deepspeed, got {raw!r}")


def _node_rank(args: LaunchArgs, env: Mapping[str, str], nnodes: int) -> int:
    raw = _setting(args.node_rank, env, ENV_NODE_RANK)
    if raw is None and nnodes == 1:
        return 0
    rank = _int_setting(raw, "--node-rank", ENV_NODE_RANK, 0)
    if rank >= nnodes:
        raise LaunchError(f"--node-rank / ${ENV_NODE_RANK} is {rank}, must be < nnodes {nnodes}")
    return rank


def _master_addr(args: LaunchArgs, env: Mapping[str, str], nnodes: int) -> str:
    addr = _setting(args.master_addr, env, ENV_MASTER_ADDR)
    if addr is None:
        if nnodes > 1:
            raise LaunchError(
                f"--master-addr is required when nnodes > 1 (or set ${ENV_MASTER_ADDR})"
            )
        return "127.0.0.1"
    if not re.fullmatch(r"[A-Za-z0-9._:\[\]-]+", addr):
        raise LaunchError(f"--master-addr / ${ENV_MASTER_ADDR} is not a host name: {addr!r}")
    return addr


def plan_from_env(args: LaunchArgs, env: Mapping[str, str]) -> LaunchPlan:
    """The plan for this pod from the flags, falling back to the operator's environment."""
    nnodes = _int_setting(_setting(args.nnodes, env, ENV_NNODES) or "1", "--nnodes", ENV_NNODES, 1)
    nproc_raw = _setting(args.nproc_per_node, env, ENV_NPROC)
    port_raw = _setting(args.master_port, env, ENV_MASTER_PORT) or str(DEFAULT_MASTER_PORT)
    port = _int_setting(port_raw, "--master-port", ENV_MASTER_PORT, 1)
    if port > 65535:
        raise LaunchError(f"--master-port / ${ENV_MASTER_PORT} must be <= 65535, got {port}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", args.module):
        raise LaunchError(f"--module must be a Python module name, got {args.module!r}")
    return LaunchPlan(
        launcher=_launcher(args, env),
        nnodes=nnodes,
        nproc_per_node=_int_setting(nproc_raw, "--nproc-per-node", ENV_NPROC, 1),
        node_rank=_node_rank(args, env, nnodes),
        master_addr=_master_addr(args, env, nnodes),
        master_port=port,
        module=args.module,
        args=args.trainer_args,
    )


def hostfile_text(plan: LaunchPlan) -> str:
    """A deepspeed hostfile naming every node (only the order and slots matter with --no_ssh).

    Without a hostfile, the deepspeed runner counts local accelerators (on CPU: NUMA nodes),
    rewrites --master_addr to 127.0.0.1 and refuses --num_nodes > 1, so we always write one.
    """
    return "".join(f"node-{i} slots={plan.nproc_per_node}\n" for i in range(plan.nnodes))


def build_command(plan: LaunchPlan) -> list[str]:
    """The launcher's argv for this pod (pure; the per-rank program is `-m plan.module`)."""
    if plan.launcher == "deepspeed":
        return _deepspeed_command(plan)
    cmd = [plan.python, "-m", "torch.distributed.run", "--nnodes", str(plan.nnodes)]
    cmd += ["--nproc-per-node", str(plan.nproc_per_node)]
    if plan.nnodes == 1:
        cmd.append("--standalone")
    else:
        # Static rendezvous at pod 0: global rank = node rank x nproc + local rank, so pod
        # index 0 always holds global rank 0 (the one serving /health that the operator
        # reads). c10d ranks nodes by arrival: pod 1 could become rank 0. The operator
        # restarts the whole gang on any failure, so elastic membership buys nothing.
        cmd += ["--node-rank", str(plan.node_rank), "--rdzv-backend", "static"]
        cmd += ["--master-addr", plan.master_addr, "--master-port", str(plan.master_port)]
    cmd += ["--max-restarts", "0", "-m", plan.module, *plan.args]
    return cmd


def _deepspeed_command(plan: LaunchPlan) -> list[str]:
    if not plan.hostfile:
        raise LaunchError("the deepspeed launcher needs a hostfile (see hostfile_text)")
    cmd = [plan.python, "-m", "deepspeed.launcher.runner", "--hostfile", plan.hostfile]
    cmd += ["--no_ssh", "--node_rank", str(plan.node_rank), "--num_nodes", str(plan.nnodes)]
    cmd += ["--num_gpus", str(plan.nproc_per_node), "--master_addr", plan.master_addr]
    # --no_local_rank: ranks read LOCAL_RANK from the environment, as under torchrun.
    cmd += ["--master_port", str(plan.master_port), "--no_local_rank"]
    cmd += ["--module", plan.module, *plan.args]
    return cmd


_SECRET_WORDS = re.compile(r"(token|secret|password|passwd|api[-_]?key)", re.IGNORECASE)


def redact(cmd: list[str]) -> list[str]:
    """cmd with the values of secret-looking flags (`--hf-token X`, `--token=X`) masked."""
    out: list[str] = []
    mask_next = False
    for arg in cmd:
        if mask_next:
            out.append("***")
            mask_next = False
        elif arg.startswith("-") and _SECRET_WORDS.search(arg):
            name, sep, _ = arg.partition("=")
            out.append(f"{name}=***" if sep else arg)
            mask_next = not sep
        else:
            out.append(arg)
    return out
