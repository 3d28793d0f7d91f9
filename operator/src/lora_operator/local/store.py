"""The object store of the emulated API server: write semantics of kube-apiserver.

Synchronous (all calls run on the server's event loop, so each call is atomic). Implements
uid / resourceVersion (global, monotonic) / creationTimestamp / generation, optimistic
concurrency, the status subresource, finalizers + deletionTimestamp, ownerReference garbage
collection, CRD schema defaults + validation, and a watch history.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import random
import uuid
from dataclasses import dataclass
from typing import Any

from lora_operator.api.schema_check import check_object, unknown_fields
from lora_operator.local.catalog import CRD_GROUP, Catalog, ResourceType
from lora_operator.local.patching import APPLY_PATCH, STRATEGIC_PATCH, apply_patch, field_set

Obj = dict[str, Any]
Key = tuple[str, str, str, str]  # group, plural, namespace ("" = cluster-scoped), name
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # utilrand's alphabet for generateName


class ApiError(Exception):
    """An error answered as a metav1.Status."""

    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def not_found(rtype: ResourceType, name: str) -> ApiError:
    msg = f'{rtype.group_resource} "{name}" not found'
    return ApiError(404, "NotFound", msg, name=name, group=rtype.group, kind=rtype.plural)


def conflict(rtype: ResourceType, name: str) -> ApiError:
    msg = (
        f'Operation cannot be fulfilled on {rtype.group_resource} "{name}": the object has '
        "been modified; please apply your changes to the latest version and try again"
    )
    return ApiError(409, "Conflict", msg, name=name, group=rtype.group, kind=rtype.plural)


def invalid(rtype: ResourceType, name: str, causes: list[tuple[str, str]]) -> ApiError:
    text = ", ".join(f"{f}: Invalid value: {m}" for f, m in causes)
    gk = f"{rtype.kind}.{rtype.group}" if rtype.group else rtype.kind
    return ApiError(
        422,
        "Invalid",
        f'{gk} "{name}" is invalid: {text}',
        name=name,
        group=rtype.group,
        kind=rtype.kind,
        causes=[
            {"reason": "FieldValueInvalid", "message": f"Invalid value: {m}", "field": f}
            for f, m in causes
        ],
    )


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class WatchEvent:
    rv: int
    group: str
    plural: str
    type: str
    obj: Obj


def _spec_part(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


def _meta_comparable(obj: Obj) -> Obj:
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k != "managedFields"}
    return {**obj, "metadata": meta}


def prune(value: Any, schema: dict[str, Any]) -> Any:
    """Drop the fields a structural schema does not declare, as the API server does."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        return {k: prune(v, props[k]) for k, v in value.items() if k in props}
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {k: prune(v, schema["additionalProperties"]) for k, v in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [prune(v, schema["items"]) for v in value]
    return value


class Store:
    """All objects, the global resourceVersion counter and the event history."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.objects: dict[Key, Obj] = {}
        self.rv = 0
        self.history: list[WatchEvent] = []
        self.watchers: set[asyncio.Queue[WatchEvent]] = set()
        self.gc_delay = 0.05
        self.strict = False  # fieldValidation=Strict of the request being served

    # --- bookkeeping -------------------------------------------------------------------------
    def _emit(self, rtype: ResourceType, etype: str, obj: Obj) -> None:
        event = WatchEvent(
            int(obj["metadata"]["resourceVersion"]),
            rtype.group,
            rtype.plural,
            etype,
            copy.deepcopy(obj),
        )
        self.history.append(event)
        for queue in self.watchers:
            queue.put_nowait(event)

    def _bump(self, obj: Obj) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def key(self, rtype: ResourceType, namespace: str | None, name: str) -> Key:
        return (rtype.group, rtype.plural, namespace or "" if rtype.namespaced else "", name)

    def get(self, rtype: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self.objects.get(self.key(rtype, namespace, name))
        if obj is None:
            raise not_found(rtype, name)
        return obj

    def list(self, rtype: ResourceType, namespace: str | None) -> list[Obj]:
        return [
            obj
            for (g, p, ns, _), obj in sorted(self.objects.items())
            if (g, p) == (rtype.group, rtype.plural) and (not namespace or ns == namespace)
        ]

    # --- admission ---------------------------------------------------------------------------
    def _admit(self, rtype: ResourceType, obj: Obj) -> Obj:
        """Defaults + validation; unknown fields are pruned unless fieldValidation=Strict."""
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        if rtype.schema is None:
            return obj
        if self.strict and (unknown := unknown_fields(obj, rtype.schema)):
            names = ", ".join(f'unknown field "{p.path}"' for p in unknown)
            raise ApiError(400, "BadRequest", f"strict decoding error: {names}")
        defaulted, problems = check_object(prune(obj, rtype.schema), rtype.schema)
        if problems:
            name = obj.get("metadata", {}).get("name", "")
            raise invalid(rtype, name, [(p.path, p.message) for p in problems])
        result: Obj = defaulted
        return result

    # --- writes ------------------------------------------------------------------------------
    def create(self, rtype: ResourceType, namespace: str | None, body: Obj) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if rtype.namespaced:
            if namespace and meta.get("namespace", namespace) != namespace:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does "
                    "not match the namespace sent on the request",
                )
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(random.choice(_NAME_CHARS) for _ in range(5))
            meta["name"] = meta["generateName"] + suffix
        if not meta.get("name"):
            raise invalid(rtype, "", [("metadata.name", "name or generateName is required")])
        key = self.key(rtype, meta.get("namespace"), meta["name"])
        if key in self.objects:
            msg = f'{rtype.group_resource} "{meta["name"]}" already exists'
            raise ApiError(
                409, "AlreadyExists", msg, name=meta["name"], group=rtype.group, kind=rtype.plural
            )
        if rtype.has_status and rtype.custom:
            obj.pop("status", None)  # the status stanza is ignored on create
        for field in ("resourceVersion", "deletionTimestamp"):
            meta.pop(field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_iso(), generation=1)
        obj = self._admit(rtype, obj)
        self._bump(obj)
        self.objects[key] = obj
        self._on_crd(rtype, obj)
        self._emit(rtype, "ADDED", obj)
        return obj

    def update(self, rtype: ResourceType, old: Obj, new: Obj, subresource: str | None) -> Obj:
        """Commit new over old: preconditions, status isolation, generation, finalizers."""
        name = old["metadata"]["name"]
        sent_rv = new.get("metadata", {}).get("resourceVersion")
        if sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
            raise conflict(rtype, name)
        new = self._isolate(rtype, old, copy.deepcopy(new), subresource)
        meta = new.setdefault("metadata", {})
        for field in ("uid", "creationTimestamp", "name", "namespace", "deletionTimestamp"):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
        if old["metadata"].get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
            if added:
                raise ApiError(
                    422,
                    "Invalid",
                    "Forbidden: no new finalizers can be added if the object is being deleted",
                )
        meta["generation"] = old["metadata"].get("generation", 1)
        if _spec_part(new) != _spec_part(old):
            meta["generation"] += 1  # only spec (non-metadata, non-status) changes bump it
        new = self._admit(rtype, new)
        meta = new["metadata"]
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if _meta_comparable(new) == _meta_comparable(old):
            return old  # a no-op write does not bump the resourceVersion
        self._bump(new)
        key = self.key(rtype, meta.get("namespace"), name)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(rtype, key, new)
            return new
        self.objects[key] = new
        self._on_crd(rtype, new)
        self._emit(rtype, "MODIFIED", new)
        return new

    def _isolate(self, rtype: ResourceType, old: Obj, new: Obj, subresource: str | None) -> Obj:
        if subresource == "status":
            out = copy.deepcopy(old)  # a status write changes only .status
            out["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if "status" in new:
                out["status"] = new["status"]
            else:
                out.pop("status", None)
            return out
        if rtype.has_status:  # main-resource writes ignore .status
            new.pop("status", None)
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
        return new

    def patch(
        self,
        rtype: ResourceType,
        ns: str | None,
        name: str,
        ctype: str,
        body: Any,
        subresource: str | None,
        manager: str | None,
    ) -> Obj:
        if rtype.custom and ctype == STRATEGIC_PATCH:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an "
                f"unknown format - accepted media types include: {ctype}",
            )
        if ctype == APPLY_PATCH and self.key(rtype, ns, name) not in self.objects:
            obj = self.create(rtype, ns, self._managed(body, body, manager, "Apply"))
            return obj
        old = self.get(rtype, ns, name)
        new = apply_patch(ctype, old, body)
        if ctype != "application/json-patch+json" and isinstance(body, dict):
            sent = (body.get("metadata") or {}).get("resourceVersion")
            new["metadata"]["resourceVersion"] = sent or old["metadata"]["resourceVersion"]
        if ctype == APPLY_PATCH:
            new = self._managed(new, body, manager, "Apply")
        return self.update(rtype, old, new, subresource)

    def _managed(self, obj: Obj, applied: Obj, manager: str | None, op: str) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        entries = [e for e in meta.get("managedFields") or [] if e.get("manager") != manager]
        fields = field_set({k: v for k, v in applied.items() if k not in ("apiVersion", "kind")})
        entries.append(
            {
                "manager": manager or "unknown",
                "operation": op,
                "time": now_iso(),
                "apiVersion": applied.get("apiVersion", ""),
                "fieldsType": "FieldsV1",
                "fieldsV1": fields,
            }
        )
        meta["managedFields"] = entries
        return obj

    # --- deletion ----------------------------------------------------------------------------
    def delete(self, rtype: ResourceType, ns: str | None, name: str, orphan: bool = False) -> Obj:
        obj = self.get(rtype, ns, name)
        key = self.key(rtype, ns, name)
        if orphan:
            self._orphan(obj["metadata"]["uid"])
        if obj["metadata"].get("finalizers"):
            if obj["metadata"].get("deletionTimestamp"):
                return obj  # already being deleted: nothing changes
            obj = copy.deepcopy(obj)
            obj["metadata"]["deletionTimestamp"] = now_iso()
            obj["metadata"]["deletionGracePeriodSeconds"] = 0
            obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
            self._bump(obj)
            self.objects[key] = obj
            self._emit(rtype, "MODIFIED", obj)
            return obj
        obj = copy.deepcopy(obj)
        self._bump(obj)
        self._remove(rtype, key, obj)
        return obj

    def _remove(self, rtype: ResourceType, key: Key, obj: Obj) -> None:
        self.objects.pop(key, None)
        self._emit(rtype, "DELETED", obj)
        if rtype.group == CRD_GROUP and rtype.plural == "customresourcedefinitions":
            for crtype in [t for t in self.catalog.types.values() if t.custom]:
                if crtype.plural == obj["spec"]["names"]["plural"]:
                    for item in self.list(crtype, None):
                        self.objects.pop(
                            self.key(
                                crtype, item["metadata"].get("namespace"), item["metadata"]["name"]
                            )
                        )
            self.catalog.unregister_crd(obj)
        self._schedule_gc()

    def _orphan(self, uid: str) -> None:
        for obj in self.objects.values():
            refs = obj["metadata"].get("ownerReferences") or []
            if any(r.get("uid") == uid for r in refs):
                obj["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]

    def _schedule_gc(self) -> None:
        try:
            asyncio.get_running_loop().call_later(self.gc_delay, self.collect_garbage)
        except RuntimeError:
            self.collect_garbage()

    def collect_garbage(self) -> None:
        """Background cascading deletion: dependents whose owners are all gone get deleted."""
        uids = {o["metadata"]["uid"] for o in self.objects.values()}
        for (group, plural, ns, name), obj in list(self.objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if refs and not any(r.get("uid") in uids for r in refs):
                rtype = self._type_of(group, plural, obj)
                if rtype is not None and (group, plural, ns, name) in self.objects:
                    self.delete(rtype, ns or None, name)

    def _type_of(self, group: str, plural: str, obj: Obj) -> ResourceType | None:
        version = obj.get("apiVersion", "").rpartition("/")[2]
        return self.catalog.get(group, version, plural)

    def _on_crd(self, rtype: ResourceType, obj: Obj) -> None:
        if rtype.group != CRD_GROUP or rtype.plural != "customresourcedefinitions":
            return
        self.catalog.register_crd(obj)
        conds = [
            {
                "type": t,
                "status": "True",
                "reason": r,
                "message": "",
                "lastTransitionTime": now_iso(),
            }
            for t, r in (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))
        ]
        obj["status"] = {
            "conditions": conds,
            "acceptedNames": obj["spec"]["names"],
            "storedVersions": [v["name"] for v in obj["spec"]["versions"] if v.get("storage")],
        }
