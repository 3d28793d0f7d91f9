"""Conditions and phase as the API conventions and our printer columns need them."""

from __future__ import annotations

from lora_operator.api import constants as c
from lora_operator.conditions import derive_phase, set_condition

T0, T1 = "2026-11-29T10:00:00Z", "2026-11-29T10:05:00Z"


def test_first_set_reports_a_transition() -> None:
    conds, change = set_condition([], c.COND_DEGRADED, True, "LoRAGradientCollapse", "m", 2, T0)
    assert change is not None and change.status == "True"
    assert conds == [
        {
            "type": "Degraded",
            "status": "True",
            "reason": "LoRAGradientCollapse",
            "message": "m",
            "lastTransitionTime": T0,
            "observedGeneration": 2,
        }
    ]


def test_same_status_keeps_transition_time_but_updates_message() -> None:
    conds, _ = set_condition([], c.COND_DEGRADED, True, "LoRAGradientCollapse", "step 60", 1, T0)
    conds, change = set_condition(
        conds, c.COND_DEGRADED, True, "LoRAGradientCollapse", "step 70", 1, T1
    )
    assert change is None  # no Event for a refreshed message
    assert conds[0]["lastTransitionTime"] == T0 and conds[0]["message"] == "step 70"


def test_flip_moves_transition_time_and_keeps_other_types() -> None:
    conds, _ = set_condition([], c.COND_RUNNING, True, "Started", "", 1, T0)
    conds, _ = set_condition(conds, c.COND_DEGRADED, True, "NonFinite", "nan", 1, T0)
    conds, change = set_condition(conds, c.COND_DEGRADED, False, "Healthy", "", 1, T1)
    assert change is not None and change.status == "False"
    by_type = {x["type"]: x for x in conds}
    assert by_type["Degraded"]["lastTransitionTime"] == T1
    assert by_type["Running"]["status"] == "True" and len(conds) == 2


def test_new_generation_updates_observed_generation_without_an_event() -> None:
    conds, _ = set_condition([], c.COND_RUNNING, True, "Started", "", 1, T0)
    conds, change = set_condition(conds, c.COND_RUNNING, True, "Started", "", 2, T1)
    assert change is None
    assert conds[0]["observedGeneration"] == 2 and conds[0]["lastTransitionTime"] == T0


def test_unchanged_condition_returns_equal_list() -> None:
    conds, _ = set_condition([], c.COND_RUNNING, True, "Started", "", 1, T0)
    again, change = set_condition(conds, c.COND_RUNNING, True, "Started", "", 1, T1)
    assert again == conds and change is None


def test_phase_is_derived_with_terminal_states_first() -> None:
    conds, _ = set_condition([], c.COND_RUNNING, True, "Started", "", 1, T0)
    assert derive_phase([], 0) == "Pending"
    assert derive_phase(conds, 0) == "Starting"
    assert derive_phase(conds, 2) == "Running"
    suspended, _ = set_condition(conds, c.COND_SUSPENDED, True, "SuspendedByUser", "", 1, T1)
    assert derive_phase(suspended, 0) == "Suspended"
    # a resumed job is not shown as Suspended (Kubeflow's stale-column bug)
    resumed, _ = set_condition(suspended, c.COND_SUSPENDED, False, "Resumed", "", 2, T1)
    assert derive_phase(resumed, 2) == "Running"
    done, _ = set_condition(resumed, c.COND_SUCCEEDED, True, "Completed", "", 2, T1)
    assert derive_phase(done, 0) == "Succeeded"
