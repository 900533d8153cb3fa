"""Who did it: the process behind an event, and the network namespace's name.

In process context (close(), connect(), setsockopt) the task on the CPU is the culprit. In softirq
(packet receive, TCP timers) it is whoever happened to be interrupted, so rsttrace names the
socket's owner instead — found from the socket inode the BPF program read (sk->sk_socket) in an
index of /proc/*/fd — or nobody (an RST for a port nobody listens on has no owner).
"""
from __future__ import annotations

import os
import time

from ..events.decode import Event


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def process_info(pid: int) -> dict | None:
    status = _read(f"/proc/{pid}/status")
    if status is None:
        return None
    info = {"pid": pid, "comm": None, "uid": None}
    for line in status.splitlines():
        if line.startswith("Name:"):
            info["comm"] = line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else ""
        elif line.startswith("Uid:"):
            info["uid"] = int(line.split()[1])
        elif line.startswith("Tgid:"):
            info["pid"] = int(line.split()[1])
    return info


class SocketOwners:
    """socket inode → owning pids, from /proc/*/fd links. Rebuilt on a miss, at most every `min_interval` s."""

    def __init__(self, min_interval: float = 0.25):
        self.min_interval = min_interval
        self._index: dict[int, list[int]] = {}
        self._built_at = 0.0
        self.rebuilds = 0

    def _rebuild(self) -> None:
        index: dict[int, list[int]] = {}
        my_pid = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == my_pid:
                continue
            fd_dir = f"/proc/{entry.name}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    index.setdefault(int(target[8:-1]), []).append(int(entry.name))
        self._index = index
        self._built_at = time.monotonic()
        self.rebuilds += 1

    def owners(self, inode: int) -> list[int]:
        if not inode:
            return []
        pids = self._index.get(inode)
        if pids is None and time.monotonic() - self._built_at >= self.min_interval:
            self._rebuild()
            pids = self._index.get(inode)
        return sorted(set(pids or []))


class NetnsNames:
    """netns inode → `ip netns` name (from /run/netns bind mounts), re-read when an unknown inode shows up."""

    def __init__(self, min_interval: float = 1.0):
        self.min_interval = min_interval
        self._names: dict[int, str] = {}
        self._read_at = 0.0
        self.host_netns = os.stat("/proc/1/ns/net").st_ino if os.path.exists("/proc/1/ns/net") else 0

    def _reread(self) -> None:
        names = {}
        try:
            for entry in os.scandir("/run/netns"):
                try:
                    names[os.stat(entry.path).st_ino] = entry.name
                except OSError:
                    continue
        except OSError:
            pass
        self._names = names
        self._read_at = time.monotonic()

    def name(self, inode: int) -> str | None:
        if inode == self.host_netns:
            return "host"
        if inode not in self._names and time.monotonic() - self._read_at >= self.min_interval:
            self._reread()
        return self._names.get(inode)


class Attributor:
    def __init__(self, context_known: bool = True):
        self.context_known = context_known
        self.sockets = SocketOwners()
        self.netns = NetnsNames()

    def attribute(self, ev: Event) -> None:
        ev.netns_name = self.netns.name(ev.netns)
        if self.context_known and not ev.softirq:
            ev.process = {"pid": ev.task_pid, "comm": ev.task_comm, "uid": ev.task_uid, "source": "task"}
            return
        for pid in self.sockets.owners(ev.sock_ino):
            info = process_info(pid)
            if info:
                info["source"] = "socket_owner"
                ev.process = info
                return
        ev.process = None
