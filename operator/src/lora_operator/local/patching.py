"""The patch flavours of the Kubernetes API: JSON patch, merge patch, strategic merge patch.

- JSON patch (RFC 6902), including `test` ops, via the jsonpatch package.
- JSON merge patch (RFC 7386): dicts merge recursively, null deletes, lists replace.
- Strategic merge patch (the built-in types only; CRDs answer 415): lists of named objects
  merge by their merge key (containers by name, conditions by type, ...), `$patch: delete`
  / `$patch: replace` directives, and finalizers merge as a set.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from lora_operator.api.merge import merge_patch

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

# Field name -> merge key, as the patchMergeKey tags of the built-in Go types say.
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "conditions": "type",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
}
# Lists of scalars whose patchStrategy is merge (a set union).
SET_LISTS = {"finalizers"}


class PatchError(Exception):
    """The patch cannot be applied; code is the HTTP status to answer."""

    def __init__(self, message: str, code: int = 422) -> None:
        super().__init__(message)
        self.code = code


def json_patch(target: dict[str, Any], ops: Any) -> dict[str, Any]:
    """Apply an RFC 6902 patch; a failed `test` op is a 422, as in kube-apiserver."""
    if not isinstance(ops, list):
        raise PatchError("json patch must be a list of operations", 400)
    try:
        result = jsonpatch.JsonPatch(ops).apply(copy.deepcopy(target))
    except jsonpatch.JsonPatchTestFailed as exc:
        raise PatchError(str(exc), 422) from exc
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
        raise PatchError(str(exc), 422) from exc
    except (KeyError, IndexError, TypeError) as exc:
        raise PatchError(f"cannot apply json patch: {exc}", 422) from exc
    if not isinstance(result, dict):
        raise PatchError("json patch must leave an object", 422)
    return result


def strategic_merge(target: Any, patch: Any) -> Any:
    """A strategic merge patch for the built-in types (merge keys from MERGE_KEYS)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$retainKeys"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            out[field] = [v for v in out.get(field, []) if v not in (value or [])]
        elif value is None:
            out.pop(key, None)
        elif isinstance(value, list):
            out[key] = _merge_list(key, out.get(key), value)
        else:
            out[key] = strategic_merge(out.get(key), value)
    return out


def _merge_list(field: str, live: Any, patch: list[Any]) -> list[Any]:
    live_list: list[Any] = copy.deepcopy(live) if isinstance(live, list) else []
    if field in SET_LISTS:
        return live_list + [v for v in patch if v not in live_list]
    key = MERGE_KEYS.get(field)
    if key is None or not all(isinstance(item, dict) for item in patch):
        return copy.deepcopy(patch)
    if any(item.get("$patch") == "replace" for item in patch):
        return [copy.deepcopy(i) for i in patch if i.get("$patch") != "replace"]
    for item in patch:
        index = next((i for i, cur in enumerate(live_list) if cur.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if index is not None:
                del live_list[index]
        elif index is None:
            live_list.append(strategic_merge({}, item))
        else:
            live_list[index] = strategic_merge(live_list[index], item)
    return live_list


def apply_patch(content_type: str, target: dict[str, Any], patch: Any) -> dict[str, Any]:
    """Apply a patch body of the given Content-Type to the target (a deep copy is returned)."""
    if content_type == JSON_PATCH:
        return json_patch(target, patch)
    if not isinstance(patch, dict):
        raise PatchError("patch body must be a JSON object", 400)
    if content_type == MERGE_PATCH:
        result = merge_patch(target, patch)
    elif content_type in (STRATEGIC_PATCH, APPLY_PATCH):
        result = strategic_merge(target, patch)
    else:
        raise PatchError(f"unsupported patch type {content_type!r}", 415)
    assert isinstance(result, dict)
    return result


def field_set(value: Any) -> dict[str, Any]:
    """A FieldsV1-like set of the fields a body sets (for managedFields of apply)."""
    if not isinstance(value, dict):
        return {}
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, list) and key in MERGE_KEYS:
            mk = MERGE_KEYS[key]
            out[f"f:{key}"] = {
                f'k:{{"{mk}":"{e.get(mk)}"}}': field_set(e) for e in item if isinstance(e, dict)
            }
        else:
            out[f"f:{key}"] = field_set(item)
    return out
