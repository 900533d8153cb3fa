"""Which cgroup — and which container — a process runs in, from /proc/<pid>/cgroup.

The cgroup v2 line (`0::/path`) gives the path; its id is the inode of that directory on the cgroup2
mount (the same number bpf_get_current_cgroup_id() returns). Container runtimes name the cgroup they
create after the container id, so the id can be read from the path:

    docker (systemd driver)       /system.slice/docker-<64 hex>.scope
    docker (cgroupfs driver)      /docker/<64 hex>
    containerd (CRI)              .../cri-containerd-<64 hex>.scope
    cri-o                         .../crio-<64 hex>.scope
    podman                        .../libpod-<64 hex>.scope, /libpod_parent/libpod-<64 hex>
    kubernetes (cgroupfs driver)  /kubepods/<qos>/pod<uid>/<64 hex>

On hybrid (v1 + v2) hosts the runtime may name only the v1 hierarchies, so every line is read.
conmon (crio-conmon-…, libpod-conmon-…) is the runtime's monitor, not the container: not matched.
A Kubernetes container's pod names come from the runtime's state on the node (pods.py).

/proc/<pid>/cgroup and mountinfo give paths relative to the reader's cgroup namespace. In a container
with one of its own (rsttrace as a DaemonSet), a host process's path reads /../kubepods.slice/…,
relative to rsttrace's own cgroup: where that cgroup is, as the host names it, is asked once from a
thread that enters the host's cgroup namespace (pid 1's, with hostPID), and every path is then the
host's. The host's hierarchy mounted in the container (mountinfo root: /../..) gives the ids.
"""
from __future__ import annotations

import ctypes
import os
import posixpath
import re
import threading
import time

from .pods import Pods

CLONE_NEWCGROUP = 0x02000000

_PREFIXED = re.compile(r"^(docker|cri-containerd|crio|libpod)-([0-9a-f]{64})(?:\.scope)?$")
_BARE = re.compile(r"^[0-9a-f]{64}$")
_POD = re.compile(r"^(?:kubepods(?:-[a-z]+)*-)?pod([0-9a-f_-]{32,36})(?:\.slice)?$")
RUNTIMES = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o", "libpod": "podman"}


def parse_proc_cgroup(text: str) -> tuple[str | None, list[str]]:
    """(cgroup v2 path or None, every hierarchy's path) from the text of /proc/<pid>/cgroup."""
    v2, paths = None, []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":
            v2 = path
        paths.append(path)
    return v2, paths


def container_of(path: str) -> dict | None:
    """{"id", "runtime", "pod_uid"} named by a cgroup path, the innermost container if nested."""
    found = None
    pod_uid = None
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        m = _POD.match(part)
        if m and any(p.startswith("kubepods") for p in parts[:i + 1]):
            pod_uid = m.group(1).replace("_", "-")
            continue
        m = _PREFIXED.match(part)
        if m:
            found = {"id": m.group(2), "runtime": RUNTIMES[m.group(1)], "pod_uid": pod_uid}
            continue
        if _BARE.match(part) and i > 0:
            parent = parts[i - 1]
            if parent in ("docker", "libpod_parent"):
                found = {"id": part, "runtime": "docker" if parent == "docker" else "podman", "pod_uid": pod_uid}
            elif any(p.startswith("kubepods") for p in parts[:i]):
                found = {"id": part, "runtime": None, "pod_uid": pod_uid}
    return found


def container_of_paths(v2: str | None, paths: list[str]) -> dict | None:
    """The v2 path decides when it names a container; otherwise any v1 hierarchy's path may."""
    if v2:
        found = container_of(v2)
        if found:
            return found
    for path in paths:
        found = container_of(path)
        if found:
            return found
    return None


def cgroup2_mount_and_root(mountinfo: str = "/proc/self/mountinfo") -> tuple[str, str] | None:
    """(mount point, root) of the cgroup v2 hierarchy: /sys/fs/cgroup, or /sys/fs/cgroup/unified on
    hybrid hosts; root is the cgroup the mount shows, relative to this process's cgroup namespace
    (mountinfo's 4th field). A later mount at the same point hides the earlier one: it wins."""
    found = None
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if right.split(" ", 1)[0] == "cgroup2" and len(fields) > 4:
                    if found is None or found[0] == fields[4]:
                        found = (fields[4], fields[3])
    except OSError:
        pass
    return found


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v2 hierarchy is mounted."""
    found = cgroup2_mount_and_root(mountinfo)
    return found[0] if found else None


def _cgroupns(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/cgroup").st_ino
    except OSError:
        return None


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def host_namespace() -> str | None:
    """A /proc/PID/ns/cgroup of the host's cgroup namespace, None where this process is in it:
    pid 1's (hostPID), else, where pid 1's cannot be read, the nearest ancestor's outside this
    process's namespace (the runtime's shim that started the container)."""
    own = _cgroupns("self")
    if own is None:
        return None                                     # no cgroup namespaces
    first = _cgroupns(1)
    if first is not None:
        return None if first == own else "/proc/1/ns/cgroup"
    pid = os.getpid()
    for _ in range(64):
        pid = _parent(pid)
        if pid <= 1:
            return None
        ns = _cgroupns(pid)
        if ns is not None and ns != own:
            return f"/proc/{pid}/ns/cgroup"
    return None


def namespace_root() -> str | None:
    """Where this process's cgroup namespace is rooted, as the host's names it: "/" in the host's
    own; None where that cannot be known (no CAP_SYS_ADMIN to enter the host's namespace).
    setns() moves only the calling thread: a short-lived one asks."""
    host_ns = host_namespace()
    if host_ns is None:
        return "/"
    found: list[str | None] = []

    def ask() -> None:
        try:
            fd = os.open(host_ns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWCGROUP) != 0:
                    return
            finally:
                os.close(fd)
            with open("/proc/thread-self/cgroup") as f:
                found.append(parse_proc_cgroup(f.read())[0])
        except OSError:
            pass
    thread = threading.Thread(target=ask, name="rsttrace-cgroupns", daemon=True)
    thread.start()
    thread.join()
    return found[0] if found and found[0] and found[0].startswith("/") else None


def host_path(path: str, ns_root: str | None) -> str | None:
    """A path read in this process's cgroup namespace (/proc/PID/cgroup, mountinfo) as the host's
    namespace names it; None where it leaves the namespace and the namespace's place is unknown."""
    if ns_root is None:
        return None if ".." in path.split("/") else path
    return posixpath.normpath(posixpath.join(ns_root, path.lstrip("/")))


def below(path: str, top: str) -> str | None:
    """`path` relative to its ancestor `top` ("/…"), or None where `top` is not an ancestor."""
    if top == "/" or path == top:
        return path[len(top.rstrip("/")):] or "/"
    return path[len(top):] if path.startswith(top + "/") else None


_libc = ctypes.CDLL(None, use_errno=True)


def path_matches(path: str | None, prefix: str) -> bool:
    """`prefix` names this cgroup or one of its ancestors (whole path components only)."""
    if path is None:
        return False
    prefix = prefix.rstrip("/") or "/"
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


class Cgroups:
    """pid → {"id", "path"} and container, read once per pid and kept `ttl` seconds (a pid is reused
    only after its process exited; the ttl bounds how long a moved or reused pid is misnamed), and
    kept after the process exits so that its late events are still placed."""

    def __init__(self, ttl: float = 5.0, proc: str = "/proc", pods: Pods | None = None):
        self.ttl = ttl
        self.proc = proc
        self.mount, mount_root = cgroup2_mount_and_root() or (None, "/")
        self.ns_root = namespace_root()
        self.mount_shows = host_path(mount_root, self.ns_root)     # the cgroup the mount's root is
        self.pods = pods if pods is not None else Pods()
        self._cache: dict[int, tuple[float, dict | None, dict | None]] = {}
        self.reads = 0

    def _read(self, pid: int) -> tuple[dict | None, dict | None] | None:
        try:
            with open(f"{self.proc}/{pid}/cgroup") as f:
                text = f.read()
        except OSError:
            return None
        self.reads += 1
        v2, paths = parse_proc_cgroup(text)
        cgroup = None
        if v2 is not None:
            path = host_path(v2, self.ns_root)
            cgroup = {"id": None, "path": v2 if path is None else path}
            inside = below(path, self.mount_shows) if path is not None and self.mount_shows is not None else None
            if self.mount and inside is not None:
                try:
                    cgroup["id"] = os.stat(self.mount + (inside if inside != "/" else "")).st_ino
                except OSError:
                    pass   # the cgroup is already gone
        container = container_of_paths(v2, paths)
        if container and container["pod_uid"]:
            container["pod"] = self.pods.of(container)
        return cgroup, container

    def of(self, pid: int) -> tuple[dict | None, dict | None]:
        """(cgroup, container) of process `pid`; (None, None) when it is gone and was never read."""
        now = time.monotonic()
        hit = self._cache.get(pid)
        if hit and now - hit[0] < self.ttl:
            return hit[1], hit[2]
        got = self._read(pid)
        if got is None:       # gone: keep what was known (or nothing), and do not ask /proc again for a while
            got = (hit[1], hit[2]) if hit else (None, None)
        self._cache[pid] = (now, *got)
        if len(self._cache) > 8192:
            self._cache.pop(next(iter(self._cache)))
        return got
