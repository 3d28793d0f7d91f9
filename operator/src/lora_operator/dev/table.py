"""What dev mode prints (pure): a `kubectl get lft -w`-like row per job, and each job's
outcome in a sentence a user can act on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_operator.api import constants as c
from lora_operator.health.summary import gain_text

COLUMNS = ("NAME", "PHASE", "HEALTH", "STEP", "LOSS", "ETA", "REASON")
WIDTHS = (16, 10, 9, 11, 7, 6, 0)


def condition(obj: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    conds = (obj.get("status") or {}).get("conditions") or []
    return next((x for x in conds if x.get("type") == ctype), None)


def _true(obj: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    cond = condition(obj, ctype)
    return cond if cond is not None and cond.get("status") == "True" else None


def row(obj: Mapping[str, Any]) -> tuple[str, ...]:
    """NAME PHASE HEALTH STEP LOSS ETA REASON of one LoRAFineTune."""
    status = obj.get("status") or {}
    progress = status.get("progress") or {}
    health = status.get("health") or {}
    loss = (status.get("metrics") or {}).get("loss")
    step = progress.get("step")
    total = progress.get("totalSteps")
    eta = progress.get("etaSeconds")
    reason = ""
    for ctype in (c.COND_FAILED, c.COND_DEGRADED, c.COND_SUSPENDED):
        cond = _true(obj, ctype)
        if cond is not None:
            reason = str(cond.get("reason") or "")
            break
    spec_ok = condition(obj, c.COND_SPEC_ACCEPTED)
    if not reason and spec_ok is not None and spec_ok.get("status") == "False":
        reason = str(spec_ok.get("reason") or "")
    return (
        obj["metadata"]["name"],
        str(status.get("phase") or "-"),
        str(health.get("verdict") or "-"),
        "-" if step is None else (f"{step}/{total}" if total else str(step)),
        "-" if not isinstance(loss, int | float) else f"{loss:.3f}",
        "-" if not isinstance(eta, int | float) or status.get("phase") != c.PHASE_RUNNING
        else f"{eta:.0f}s",
        reason,
    )  # fmt: skip


def change_key(obj: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes a new line of the live table: phase, health, reason, every 10% of steps."""
    cells = row(obj)
    progress = (obj.get("status") or {}).get("progress") or {}
    percent = progress.get("percent")
    bucket = int(percent // 10) if isinstance(percent, int | float) else None
    return (cells[0], cells[1], cells[2], cells[6], bucket)


def format_row(cells: tuple[str, ...]) -> str:
    return "  ".join(v.ljust(w) for v, w in zip(cells, WIDTHS, strict=True)).rstrip()


def settled(obj: Mapping[str, Any]) -> bool:
    """Nothing more will happen without the user: finished, or suspended."""
    phase = (obj.get("status") or {}).get("phase")
    return phase in (c.PHASE_SUCCEEDED, c.PHASE_FAILED, c.PHASE_SUSPENDED)


def outcome(obj: Mapping[str, Any], summary: Mapping[str, Any] | None) -> str:
    """One paragraph: how the job ended and why, with the numbers a user checks."""
    name = obj["metadata"]["name"]
    status = obj.get("status") or {}
    phase = status.get("phase")
    progress = status.get("progress") or {}
    lines = [f"{name}: {phase}"]
    degraded = _true(obj, c.COND_DEGRADED)
    if degraded is not None:
        lines.append(f"  Degraded: {degraded.get('reason')}: {degraded.get('message')}")
    if phase == c.PHASE_SUCCEEDED:
        gain = gain_text(summary or {})
        if gain:
            lines.append(f"  gain: {gain}")
    elif phase == c.PHASE_SUSPENDED:
        cond = _true(obj, c.COND_SUSPENDED) or {}
        step, total = progress.get("step"), progress.get("totalSteps")
        if isinstance(step, int) and isinstance(total, int) and total:
            spared = total - step
            lines.append(
                f"  Suspended ({cond.get('reason')}) at step {step} of {total}: "
                f"{spared} steps ({100 * spared / total:.0f}% of the budget) not spent"
            )
        else:
            lines.append(f"  Suspended ({cond.get('reason')}): {cond.get('message')}")
    elif phase == c.PHASE_FAILED:
        cond = _true(obj, c.COND_FAILED) or {}
        lines.append(f"  Failed ({cond.get('reason')}): {cond.get('message')}")
    return "\n".join(lines)
