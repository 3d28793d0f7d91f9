"""One pod as local processes: loopback IP, volumes, env, name rewriting, process groups.

The container image is ignored: each container's command runs on this machine with the
runner's Python environment (its bin directory first on PATH), in its own session/process
group, with stdout and stderr in `<state>/pods/<ns>/<pod>/<container>.log`.

Mapping of the pod spec onto the machine:
- Network: each pod gets its own loopback address 127.0.X.Y (Linux routes all of
  127.0.0.0/8 to `lo`; X starts at a random block per runner), reserved per DNS name so
  `<hostname>.<subdomain>` keeps its address across retries. Names resolve two ways:
  (1) rewriting: in env values, command, args and workingDir,
  `<host>.<subdomain>[.<ns>[.svc[.cluster.local]]]` of the pod's own subdomain (and any
  known pod FQDN) is replaced by the IP, so non-Python resolvers (torchrun's TCPStore, curl)
  work unmodified; (2) for Python processes, a sitecustomize on PYTHONPATH (hosthook/)
  resolves names composed at run time from the runner's hosts file, with the pod's DNS
  search list. Ports: a Python process that binds a TCP socket (AF_INET) to the wildcard
  address ('' or 0.0.0.0) on one of the pod's declared TCP containerPorts
  ($LORA_LOCAL_POD_PORTS) binds the pod's IP instead (the hook wraps socket.socket.bind), so
  pods serving the same containerPort run side by side, each at `<podIP>:<port>`. Other ports,
  explicit addresses, IPv6 and non-Python programs still share the machine's ports, and a
  server moved to the pod IP is not reachable at 127.0.0.1 from its own pod.
- Volumes: configMap and secret (from the API's data, items honoured), emptyDir (a
  directory), persistentVolumeClaim (`<state>/pvcs/<ns>/<claim>`, kept across pods), hostPath
  (the path itself), anything else an empty directory. Each container gets a root directory
  `<pod>/rootfs/<container>` holding a symlink at every mountPath to its volume (with
  subPath), as the container's own root would show the mounts. A mountPath, and every
  directory above one (e.g. /mnt/pvc above /mnt/pvc/<claim>, so `$LORA_PVC_ROOT/<claim>/x`
  composed at run time resolves), is mapped by rewriting it in env values, command, args and
  workingDir, like the names: a mountPath to its volume, a directory above one to its place
  in that root; except paths below them whose first component exists on this machine (e.g.
  the interpreter of a checkout under /tmp, /dev/null): those are host paths and stay as they
  are. A mount nested inside another mount is rewritten but gets no link (the link would land
  in the outer volume). A `/tmp` mount also becomes TMPDIR. The rest of the image's root
  filesystem, readOnly, resources, probes and security contexts are not emulated.
- Termination messages: each container's terminationMessagePath (default
  /dev/termination-log) is a file `<container>.termination-log` next to its log, emptied
  before every start and mapped like a mountPath. When the container terminates, the last
  4096 bytes of it (at most 12 KiB / number of containers) become
  state.terminated.message; with terminationMessagePolicy FallbackToLogsOnError, an empty
  file and a non-zero exit code, the message is the tail of this run's log instead (last 80
  lines, at most 2048 bytes). No message key when there is nothing.
- Env: the runner's own environment, then HOSTNAME, envFrom, env with value / $(VAR)
  expansion / fieldRef (metadata.name, namespace, uid, labels['k'], annotations['k'],
  spec.nodeName, spec.serviceAccountName, status.podIP, status.hostIP) / configMapKeyRef /
  secretKeyRef.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_operator.local.kubeapi import KubeClient, Obj, path
from lora_operator.local.store import now_iso

HOOK_DIR = Path(__file__).resolve().parent / "hosthook"
TERMINATION_LOG = "/dev/termination-log"
MAX_MESSAGE = 4096  # kubelet: bytes of a container's termination message
MAX_POD_MESSAGES = 12 * 1024  # kubelet: all containers together, divided equally
LOG_TAIL_LINES, LOG_TAIL_BYTES = 80, 2048  # FallbackToLogsOnError: the tail of the log
CLUSTER_DOMAIN = "svc.cluster.local"
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class NotReadyError(Exception):
    """A referenced ConfigMap/Secret (or key) is missing: the pod waits, as the kubelet does."""


def pod_fqdn(pod: Obj) -> str | None:
    """`<hostname>.<subdomain>.<ns>.svc.cluster.local`, when the pod has both names."""
    spec, meta = pod.get("spec") or {}, pod["metadata"]
    if spec.get("hostname") and spec.get("subdomain"):
        return f"{spec['hostname']}.{spec['subdomain']}.{meta['namespace']}.{CLUSTER_DOMAIN}"
    return None


class Network:
    """Loopback IPs per pod (reserved per DNS name) and the hosts file of running pods."""

    def __init__(self, hosts_file: Path, block: int | None = None) -> None:
        self.hosts_file = hosts_file
        self._reserved: dict[str, str] = {}
        # from 127.0.<block>.1 on; a random block keeps two runners on one machine apart
        self._next = 256 * (block if block is not None else random.randint(1, 200)) + 1
        self._live: dict[str, str] = {}
        self._write()

    def ip_for(self, key: str) -> str:
        if key not in self._reserved:
            while self._next % 256 in (0, 255):
                self._next += 1
            n, self._next = self._next, self._next + 1
            self._reserved[key] = f"127.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
        return self._reserved[key]

    def known(self) -> dict[str, str]:
        return {k: v for k, v in self._reserved.items() if "." in k}

    def publish(self, fqdn: str, ip: str) -> None:
        self._live[fqdn] = ip
        self._write()

    def unpublish(self, fqdn: str) -> None:
        if self._live.pop(fqdn, None) is not None:
            self._write()

    def _write(self) -> None:
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{ip} {name}\n" for name, ip in sorted(self._live.items())))
        os.replace(tmp, self.hosts_file)


def make_rewriter(
    mounts: dict[str, str], namespace: str, subdomain: str | None, network: Network
) -> Callable[[str], str]:
    """Rewrite mount paths to local directories and pod DNS names to loopback IPs."""
    alternatives: list[str] = []
    paths = sorted((p for p in mounts if p != "/"), key=len, reverse=True)
    if paths:
        alternatives.append(
            r"(?<![\w./-])(?P<path>"
            + "|".join(re.escape(p) for p in paths)
            + r")(?P<tail>/[^\s:;,'\"=]*)?(?![\w.-])"
        )
    if subdomain:
        sub, ns = re.escape(subdomain), re.escape(namespace)
        alternatives.append(
            rf"(?<![\w.-])(?P<host>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.{sub}"
            rf"(?:\.{ns}(?:\.svc(?:\.cluster\.local)?)?)?(?![\w-])(?!\.[\w-])"
        )
    fqdns = sorted(network.known(), key=len, reverse=True)
    if fqdns:
        alternatives.append(
            r"(?<![\w.-])(?P<fqdn>" + "|".join(re.escape(f) for f in fqdns) + r")(?![\w.-])"
        )
    if not alternatives:
        return lambda text: text
    pattern = re.compile("|".join(alternatives))

    def replace(m: re.Match[str]) -> str:
        groups = m.groupdict()
        if groups.get("path"):
            path, tail = groups["path"], groups.get("tail") or ""
            if _host_path(path, tail):
                return m.group(0)
            return mounts[path] + tail
        if groups.get("host"):
            return network.ip_for(f"{groups['host']}.{subdomain}.{namespace}.{CLUSTER_DOMAIN}")
        return network.ip_for(groups["fqdn"])

    return lambda text: pattern.sub(replace, text)


def container_root(mounts: dict[str, str], rootfs: Path) -> dict[str, str]:
    """Link each mountPath under ROOTFS to its volume (not those nested in another mount);
    returns the path mapping: mountPath -> volume, a directory above a mountPath -> its
    place under ROOTFS (mountPaths win where both apply)."""
    mapping: dict[str, str] = {}
    for mount in sorted(mounts, key=len):
        parents = [str(p) for p in Path(mount).parents if str(p) != "/"]
        mapping.update({p: str(rootfs / p.lstrip("/")) for p in parents})
        if mount == "/" or any(p in mounts for p in parents):
            continue
        link = rootfs / mount.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():  # from an earlier attempt to start the pod
            link.unlink()
        link.symlink_to(mounts[mount])
    return {**mapping, **mounts}


def _host_path(mount_path: str, tail: str) -> bool:
    """A path below a mount whose first component exists on this machine is a host path
    (the local interpreter or checkout under /tmp, say), not the pod's: left alone."""
    first = tail.lstrip("/").split("/", 1)[0]
    return bool(first) and os.path.exists(os.path.join(mount_path, first))


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion ($$ escapes; unknown references stay as they are)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, text)


async def _source_data(client: KubeClient, kind: str, ns: str, name: str) -> dict[str, str]:
    """The string data of a ConfigMap or Secret (Secret data decoded); NotReadyError if missing."""
    plural = "configmaps" if kind == "ConfigMap" else "secrets"
    obj = await client.get(path("v1", plural, ns, name))
    if obj is None:
        raise NotReadyError(f'{kind.lower()} "{name}" not found')
    data = dict(obj.get("data") or {})
    if kind == "Secret":
        data = {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
        data.update(obj.get("stringData") or {})
    else:
        for key, value in (obj.get("binaryData") or {}).items():
            data[key] = base64.b64decode(value).decode(errors="replace")
    return data


def _field_value(pod: Obj, field_path: str, ip: str) -> str:
    meta, spec = pod["metadata"], pod.get("spec") or {}
    if m := _FIELD_KEY.match(field_path):
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    values = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName") or "local",
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": ip,
        "status.podIPs": ip,
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
    }
    return str(values.get(field_path) or "")


async def _value_from(client: KubeClient, pod: Obj, source: Obj, ip: str) -> str | None:
    ns = pod["metadata"]["namespace"]
    if "fieldRef" in source:
        return _field_value(pod, source["fieldRef"]["fieldPath"], ip)
    for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
        if key in source:
            ref = source[key]
            try:
                data = await _source_data(client, kind, ns, ref["name"])
                if ref["key"] not in data:
                    raise NotReadyError(
                        f"couldn't find key {ref['key']} in {kind} {ns}/{ref['name']}"
                    )
            except NotReadyError:
                if ref.get("optional"):
                    return None
                raise
            return data[ref["key"]]
    return ""  # resourceFieldRef and the like are not emulated


async def container_env(client: KubeClient, pod: Obj, container: Obj, ip: str) -> dict[str, str]:
    """The env a container declares (envFrom, then env), expanded, before rewriting."""
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if key in source:
                try:
                    data = await _source_data(client, kind, ns, source[key]["name"])
                except NotReadyError:
                    if source[key].get("optional"):
                        continue
                    raise
                env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env") or []:
        if "valueFrom" in var:
            value = await _value_from(client, pod, var["valueFrom"], ip)
            if value is not None:
                env[var["name"]] = value
        else:
            env[var["name"]] = expand(var.get("value", ""), env)
    return env


async def materialise_volumes(
    client: KubeClient, pod: Obj, root: Path, state: Path
) -> dict[str, Path]:
    """Create each volume as a local directory; returns volume name -> directory."""
    ns = pod["metadata"]["namespace"]
    out: dict[str, Path] = {}
    for vol in (pod.get("spec") or {}).get("volumes") or []:
        name = vol["name"]
        target = root / "volumes" / name
        if "persistentVolumeClaim" in vol:
            target = state / "pvcs" / ns / vol["persistentVolumeClaim"]["claimName"]
        elif "hostPath" in vol:
            target = Path(vol["hostPath"]["path"])
        target.mkdir(parents=True, exist_ok=True)
        for key, kind, ref in (
            ("configMap", "ConfigMap", "name"),
            ("secret", "Secret", "secretName"),
        ):
            if key in vol:
                try:
                    data = await _source_data(client, kind, ns, vol[key][ref])
                except NotReadyError:
                    if vol[key].get("optional"):
                        continue
                    raise
                items = vol[key].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    if item["key"] not in data:
                        raise NotReadyError(f"configmap/secret key {item['key']} not found")
                    file = target / item["path"]
                    file.parent.mkdir(parents=True, exist_ok=True)
                    file.write_text(data[item["key"]])
        out[name] = target
    return out


def process_tree(leader: int) -> set[int]:
    """LEADER and all its descendants (by /proc ppid links), whatever sessions they made."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])  # field 4 of /proc/PID/stat: ppid
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    tree, frontier = {leader}, [leader]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return tree


def signal_tree(leader: int, sig: int, also: set[int] | None = None) -> int:
    """Send SIG to LEADER, all its descendants (what a container's PID namespace holds) and
    ALSO (processes seen earlier, orphaned since); how many were signalled."""
    count = 0
    for pid in process_tree(leader) | (also or set()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            count += 1
    return count


@dataclass
class ContainerProcess:
    """One container's command as a local process group."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log_path: Path
    termination_path: Path | None = None
    fallback_to_logs: bool = False
    message_limit: int = MAX_MESSAGE
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: str = ""
    finished_at: str = ""
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    log_offset: int = 0  # where this run's output starts in the log

    async def start(self) -> None:
        self.exit_code, self.reason, self.finished_at, self.message = None, "", "", ""
        self.started_at = now_iso()
        if self.termination_path is not None:  # a new, empty file for every run
            self.termination_path.write_bytes(b"")
        with open(self.log_path, "ab") as log:
            self.log_offset = log.seek(0, os.SEEK_END)
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    env=self.env,
                    cwd=self.cwd,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # its own process group: killed as a tree
                )
            except OSError as exc:
                log.write(f"lora-operator local runner: cannot start {self.argv}: {exc}\n".encode())
                self.proc = None
                self._terminated(128, "StartError")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.exit_code is None

    async def wait(self) -> int:
        if self.proc is None:
            return self.exit_code if self.exit_code is not None else 128
        code = await self.proc.wait()
        self._kill_group(signal.SIGKILL)  # the container ends with its main process
        if self.exit_code is None:
            code = code if code >= 0 else 128 - code
            self._terminated(code, "Completed" if code == 0 else "Error")
        assert self.exit_code is not None
        return self.exit_code

    def _terminated(self, code: int, reason: str) -> None:
        self.exit_code, self.reason, self.finished_at = code, reason, now_iso()
        self.message = self._termination_message()

    def _termination_message(self) -> str:
        """The termination message file's tail, or the log's tail (FallbackToLogsOnError)."""
        data = b""
        if self.termination_path is not None:
            with contextlib.suppress(OSError):
                data = _read_tail(self.termination_path, MAX_MESSAGE)
        if not data and self.fallback_to_logs and self.exit_code:
            with contextlib.suppress(OSError):
                tail = _read_tail(self.log_path, LOG_TAIL_BYTES, self.log_offset)
                data = b"".join(tail.splitlines(keepends=True)[-LOG_TAIL_LINES:])
        return data[: self.message_limit].decode(errors="replace")

    def _kill_group(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    async def kill(self, grace: float) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period to every process of
        the container: the group and all descendants seen before or after the SIGTERM (a
        launcher's workers run in sessions of their own and outlive a group kill)."""
        if self.proc is None or self.proc.returncode is not None:
            self._kill_group(signal.SIGKILL)
            return
        seen = process_tree(self.proc.pid)
        self._kill_group(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace)
        self._kill_group(signal.SIGKILL)
        signal_tree(self.proc.pid, signal.SIGKILL, seen - {self.proc.pid})
        await self.proc.wait()

    def status(self) -> Obj:
        state: Obj
        if self.running:
            state = {"running": {"startedAt": self.started_at}}
        elif self.exit_code is not None:
            state = {
                "terminated": {
                    "exitCode": self.exit_code,
                    "reason": self.reason,
                    "startedAt": self.started_at,
                    "finishedAt": self.finished_at,
                }
            }
            if self.message:
                state["terminated"]["message"] = self.message
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        return {
            "name": self.name,
            "image": "",
            "imageID": "",
            "ready": self.running,
            "started": self.running,
            "restartCount": self.restarts,
            "state": state,
            "lastState": {},
        }


def _read_tail(file: Path, limit: int, start: int = 0) -> bytes:
    """At most the last `limit` bytes of a file, from byte `start` on."""
    with open(file, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(start, size - limit))
        return fh.read(limit)


def _pod_ports(spec: Obj) -> str:
    """The pod's declared TCP containerPorts, comma-separated (for the sitecustomize hook)."""
    ports = {
        int(port["containerPort"])
        for container in spec.get("containers") or []
        for port in container.get("ports") or []
        if port.get("protocol", "TCP") == "TCP" and "containerPort" in port
    }
    return ",".join(str(p) for p in sorted(ports))


async def build_containers(
    client: KubeClient, pod: Obj, ip: str, root: Path, state: Path, network: Network
) -> list[ContainerProcess]:
    """Materialise the pod's volumes and describe its containers' processes."""
    meta, spec = pod["metadata"], pod.get("spec") or {}
    volumes = await materialise_volumes(client, pod, root, state)
    base = dict(os.environ)
    base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "")])
    base["HOSTNAME"] = spec.get("hostname") or meta["name"]
    containers = spec.get("containers") or []
    message_limit = min(MAX_MESSAGE, MAX_POD_MESSAGES // max(1, len(containers)))
    out = []
    for container in containers:
        mounts = {
            m["mountPath"].rstrip("/") or "/": str(volumes[m["name"]] / m.get("subPath", ""))
            for m in container.get("volumeMounts") or []
            if m["name"] in volumes
        }
        termination = root / f"{container['name']}.termination-log"
        termination.write_bytes(b"")
        mounts.setdefault(
            container.get("terminationMessagePath") or TERMINATION_LOG, str(termination)
        )
        rootfs = root / "rootfs" / container["name"]
        paths = container_root(mounts, rootfs)
        rewrite = make_rewriter(paths, meta["namespace"], spec.get("subdomain"), network)
        declared = await container_env(client, pod, container, ip)
        env = {**base, **{k: rewrite(v) for k, v in declared.items()}}
        if "/tmp" in mounts and "TMPDIR" not in declared:
            env["TMPDIR"] = mounts["/tmp"]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOK_DIR), env.get("PYTHONPATH")) if p)
        env.update(
            LORA_LOCAL_HOSTS_FILE=str(network.hosts_file),
            LORA_LOCAL_NAMESPACE=meta["namespace"],
            LORA_LOCAL_POD_IP=ip,
            LORA_LOCAL_POD_PORTS=_pod_ports(spec),
            LORA_LOCAL_SUBDOMAIN=spec.get("subdomain") or "",
        )
        argv = [
            rewrite(expand(a, declared))
            for a in (container.get("command") or []) + (container.get("args") or [])
        ]
        declared_dir = container.get("workingDir") or str(root / "work")
        workdir = rewrite(declared_dir)
        if not Path(workdir).is_dir():  # created in the container's root, as a runtime does
            workdir = str(rootfs / declared_dir.lstrip("/"))
            Path(workdir).mkdir(parents=True, exist_ok=True)
        log = root / f"{container['name']}.log"
        fallback = container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        out.append(
            ContainerProcess(
                container["name"], argv, env, workdir, log, termination, fallback, message_limit
            )
        )
    return out
