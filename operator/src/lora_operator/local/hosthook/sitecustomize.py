"""Resolve the local cluster's pod hostnames inside Python processes started by the runner.

The local pod runner puts this directory first on PYTHONPATH, so Python imports this module
at startup (site.py). It wraps socket.getaddrinfo / gethostbyname / gethostbyname_ex: a name
found in the runner's hosts file ($LORA_LOCAL_HOSTS_FILE, "IP FQDN" lines, re-read when it
changes) resolves to the pod's loopback IP, trying the pod's DNS search list
(<ns>.svc.cluster.local, svc.cluster.local, cluster.local) as a pod's resolv.conf would, and
the pod's own $HOSTNAME resolves to its IP (its /etc/hosts entry). A cluster name that is
not there fails at once (no slow DNS query); any other name goes to the normal resolver.

It also emulates the pod's network namespace for servers: socket.socket.bind of a TCP
(SOCK_STREAM) AF_INET socket to the wildcard address ('' or 0.0.0.0) on one of the pod's
declared TCP containerPorts ($LORA_LOCAL_POD_PORTS, comma-separated) binds the pod's IP
($LORA_LOCAL_POD_IP) instead, so two pods can serve the same containerPort, each at
`<podIP>:<port>`. Other ports, explicit addresses and IPv6 sockets are left alone.
Then it chains to the next sitecustomize on sys.path, if any.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

_HOSTS = os.environ.get("LORA_LOCAL_HOSTS_FILE", "")
_NS = os.environ.get("LORA_LOCAL_NAMESPACE", "default")
_SEARCH = (f".{_NS}.svc.cluster.local", ".svc.cluster.local", ".cluster.local")
_SUB = os.environ.get("LORA_LOCAL_SUBDOMAIN", "")
_SELF = (os.environ.get("HOSTNAME", ""), os.environ.get("LORA_LOCAL_POD_IP", ""))
_OWN_DOMAIN = [f"{_SUB}.{_NS}.svc.cluster.local"] if _SUB else []
_PORTS = frozenset(
    int(p) for p in os.environ.get("LORA_LOCAL_POD_PORTS", "").split(",") if p.strip().isdigit()
)
_WILDCARD = ("", "0.0.0.0")
_cache: dict[str, str] = {}
_stamp: tuple[int, int, int] = (0, 0, 0)
_getaddrinfo = socket.getaddrinfo
_gethostbyname = socket.gethostbyname
_gethostbyname_ex = socket.gethostbyname_ex
_bind = socket.socket.bind


def _table() -> dict[str, str]:
    global _stamp
    try:
        st = os.stat(_HOSTS)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != _stamp:
            with open(_HOSTS) as fh:
                rows = [line.split() for line in fh if line.strip()]
            _cache.clear()
            _cache.update({name: row[0] for row in rows for name in row[1:]})
            _stamp = stamp
    except OSError:
        pass
    return _cache


def lookup(host: Any) -> str | None:
    """The loopback IP of a cluster name; raises gaierror for a missing cluster name."""
    if not isinstance(host, str) or not _HOSTS or not host or host[0].isdigit():
        return None
    name = host.rstrip(".").lower()
    if _SELF[1] and name == _SELF[0]:  # the pod's /etc/hosts entry for its own hostname
        return _SELF[1]
    table = _table()
    candidates = [name] + [name + suffix for suffix in _SEARCH]
    for candidate in candidates:
        if candidate in table:
            return table[candidate]
    domains = {n.split(".", 1)[-1] for n in table} | set(_OWN_DOMAIN)
    if "." in name and (
        name.endswith((".svc", ".cluster.local"))
        or any(c.split(".", 1)[1] in domains for c in candidates)
    ):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return None


def _getaddrinfo_hook(host: Any, *args: Any, **kwargs: Any) -> Any:
    return _getaddrinfo(lookup(host) or host, *args, **kwargs)


def _gethostbyname_hook(host: str) -> str:
    return lookup(host) or _gethostbyname(host)


def _gethostbyname_ex_hook(host: str) -> tuple[str, list[str], list[str]]:
    ip = lookup(host)
    return (host, [], [ip]) if ip else _gethostbyname_ex(host)


def pod_address(sock: socket.socket, address: Any) -> Any:
    """A wildcard AF_INET TCP address on a declared containerPort -> the pod's IP."""
    if (
        _PORTS
        and _SELF[1]
        and sock.family == socket.AF_INET
        and sock.type == socket.SOCK_STREAM
        and isinstance(address, tuple)
        and len(address) == 2
        and address[0] in _WILDCARD
        and address[1] in _PORTS
    ):
        return (_SELF[1], address[1])
    return address


def _bind_hook(self: socket.socket, address: Any) -> None:
    _bind(self, pod_address(self, address))


socket.getaddrinfo = _getaddrinfo_hook
socket.gethostbyname = _gethostbyname_hook
socket.gethostbyname_ex = _gethostbyname_ex_hook
socket.socket.bind = _bind_hook  # type: ignore[method-assign,assignment]


def _chain() -> None:
    """Import the sitecustomize this one shadows (a venv's or the distribution's)."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved, module = list(sys.path), sys.modules.pop("sitecustomize", None)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        import sitecustomize  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
        if module is not None:
            sys.modules["sitecustomize"] = module


_chain()
