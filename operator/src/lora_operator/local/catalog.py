"""The resource types the emulated API server serves: built-ins plus registered CRDs.

Built-ins come from kmock's bundled discovery dump; a created CustomResourceDefinition adds
its served versions (with schema, status subresource and printer columns). Also renders the
discovery documents and meta.k8s.io/v1 Table output.
"""

from __future__ import annotations

import datetime
import gzip
import importlib.resources
import json
from dataclasses import dataclass, field
from typing import Any

from lora_operator.local.printers import PRINTERS

CRD_GROUP = "apiextensions.k8s.io"


@dataclass
class ResourceType:
    """One servable group/version/plural."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    verbs: list[str] = field(default_factory=list)
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    subresources: list[str] = field(default_factory=list)
    schema: dict[str, Any] | None = None
    columns: list[dict[str, Any]] = field(default_factory=list)
    custom: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources


_ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def _builtin_types() -> list[ResourceType]:
    raw = importlib.resources.files("kmock._internal").joinpath("resources.json.gz").read_bytes()
    types: dict[tuple[str, str, str], ResourceType] = {}
    for doc in json.loads(gzip.decompress(raw)):
        group, _, version = doc["groupVersion"].rpartition("/")
        for res in doc["resources"]:
            plural, _, sub = res["name"].partition("/")
            if sub:
                continue
            types[(group, version, plural)] = ResourceType(
                group=group,
                version=version,
                plural=plural,
                kind=res["kind"],
                namespaced=res["namespaced"],
                singular=res.get("singularName") or res["kind"].lower(),
                verbs=res.get("verbs", []),
                short_names=res.get("shortNames", []),
                categories=res.get("categories", []),
            )
        for res in doc["resources"]:
            plural, _, sub = res["name"].partition("/")
            if sub and (group, version, plural) in types:
                types[(group, version, plural)].subresources.append(sub)
    return list(types.values())


def crd_types(crd: dict[str, Any]) -> list[ResourceType]:
    """The resource types a CustomResourceDefinition serves (one per served version)."""
    spec = crd.get("spec", {})
    names = spec.get("names", {})
    out = []
    for ver in spec.get("versions", []):
        if not ver.get("served", True):
            continue
        subs = ver.get("subresources") or {}
        out.append(
            ResourceType(
                group=spec["group"],
                version=ver["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=names.get("singular") or names["kind"].lower(),
                verbs=list(_ALL_VERBS),
                short_names=names.get("shortNames", []),
                categories=names.get("categories", []),
                subresources=[s for s in ("status", "scale") if s in subs],
                schema=(ver.get("schema") or {}).get("openAPIV3Schema"),
                columns=ver.get("additionalPrinterColumns", []),
                custom=True,
            )
        )
    return out


class Catalog:
    """Lookup of resource types by group/version/plural (or short name)."""

    def __init__(self) -> None:
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        for rtype in _builtin_types():
            self.add(rtype)

    def add(self, rtype: ResourceType) -> None:
        self.types[(rtype.group, rtype.version, rtype.plural)] = rtype

    def register_crd(self, crd: dict[str, Any]) -> None:
        self.unregister_crd(crd)
        for rtype in crd_types(crd):
            self.add(rtype)

    def unregister_crd(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec", {})
        plural = spec.get("names", {}).get("plural")
        for key in [k for k in self.types if k[0] == spec.get("group") and k[2] == plural]:
            del self.types[key]

    def get(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self.types.get((group, version, plural))

    def group_versions(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for group, version, _ in self.types:
            if group and version not in out.setdefault(group, []):
                out[group].append(version)
        return out

    def resource_list(self, group: str, version: str) -> dict[str, Any] | None:
        rtypes = [t for (g, v, _), t in self.types.items() if (g, v) == (group, version)]
        if not rtypes:
            return None
        resources = []
        for t in rtypes:
            base = {"namespaced": t.namespaced, "kind": t.kind, "singularName": t.singular}
            resources.append(
                {"name": t.plural, **base, "verbs": t.verbs, "shortNames": t.short_names}
                | ({"categories": t.categories} if t.categories else {})
            )
            for sub in t.subresources:
                verbs = ["get", "patch", "update"]
                resources.append({"name": f"{t.plural}/{sub}", **base, "verbs": verbs})
        gv = f"{group}/{version}" if group else version
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": gv,
            "resources": resources,
        }

    def api_group(self, group: str) -> dict[str, Any] | None:
        versions = self.group_versions().get(group)
        if not versions:
            return None
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": group,
            "versions": entries,
            "preferredVersion": entries[0],
        }

    def api_group_list(self) -> dict[str, Any]:
        groups = [self.api_group(g) for g in sorted(self.group_versions())]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def human_age(timestamp: str | None, now: datetime.datetime | None = None) -> str:
    """kubectl's duration format (5s, 3m, 2h, 4d)."""
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    now = now or datetime.datetime.now(datetime.UTC)
    secs = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size * (2 if unit != "d" else 1):
            return f"{secs // size}{unit}"
    return f"{secs}s"


def _json_path(obj: Any, path: str) -> Any:
    node = obj
    for part in path.strip("{}").lstrip(".").split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _columns(rtype: ResourceType) -> list[dict[str, Any]]:
    name = {
        "name": "Name",
        "type": "string",
        "format": "name",
        "priority": 0,
        "description": "Name must be unique within a namespace.",
    }
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    return [name] + (rtype.columns or [age])


def to_table(rtype: ResourceType, items: list[dict[str, Any]], rv: str) -> dict[str, Any]:
    """A meta.k8s.io/v1 Table of items using the CRD's additionalPrinterColumns."""
    cols = _columns(rtype)
    printer = None if rtype.custom else PRINTERS.get((rtype.group, rtype.plural))
    if printer is not None:  # built-in kinds: kube-apiserver's own printers, simplified
        extra = printer[0]
        cols = cols[:1] + [c for c in extra if not c["priority"]] + cols[1:]
        cols += [c for c in extra if c["priority"]]
    rows = []
    for obj in items:
        cells: list[Any] = [obj.get("metadata", {}).get("name", "")]
        computed = printer[1](obj) if printer else {}
        for col in cols[1:]:
            if col["name"] in computed:
                cells.append(computed[col["name"]])
                continue
            value = _json_path(obj, col.get("jsonPath", ""))
            cells.append(human_age(value) if col.get("type") == "date" and value else value)
        rows.append({"cells": cells, "object": obj})
    defs = [
        {
            "name": c["name"],
            "type": c.get("type", "string"),
            "format": c.get("format", ""),
            "description": c.get("description", ""),
            "priority": c.get("priority", 0),
        }
        for c in cols
    ]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": defs,
        "rows": rows,
    }
