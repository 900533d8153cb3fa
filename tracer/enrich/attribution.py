"""Who did it: the process behind an event, its cgroup and container, and the network namespace's name.

In process context (close(), connect(), setsockopt) the task on the CPU is the culprit. In softirq
(packet receive, TCP timers) it is whoever happened to be interrupted, so rsttrace names the
socket's owner instead: the process the BPF programs saw calling listen() (listeners) or connect()
(client sockets of traced ports), else the one holding the socket inode the BPF program read
(sk->sk_socket), from an index of /proc/*/fd. A server-side socket can be closed before rsttrace
looks (a server that gets "Connection reset by peer" closes at once): rsttrace then names the
process that listens on its local port, and says so (source `port_listener`). Otherwise nobody is
named (an RST for a port nobody listens on has no owner).
"""
from __future__ import annotations

import ipaddress
import os
import time
from collections import OrderedDict

from ..events.decode import Event
from .cgroups import Cgroups
from .listeners import host_netns_path, listeners_in


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


HOT_OWNERS = 8       # owner pids scanned first when a batch has sockets newer than the index
INFO_TTL_S = 1.0     # how long a process's name and uid are taken as known without reading /proc again


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
    """socket inode → owning pids, from /proc/*/fd links.

    An index built at time T holds every socket that had a file descriptor at T. So a miss is worth
    a rebuild only when the index predates the event (the socket may be newer than the index); a
    socket missing from an index built after its event is gone or was never accept()ed. Rebuilds
    happen at most once per batch of events and at least 1/`max_per_s` apart.

    A rebuild costs in proportion to every socket on the host, so rebuilds also keep to `cpu_share` of one core: on a big host in a storm, an
    event whose socket is newer than the index may then go without an owner (`process: null`)
    rather than rsttrace falling behind the kernel."""

    def __init__(self, max_per_s: float = 50.0, cpu_share: float = 0.1):
        self.min_gap_ns = int(1e9 / max_per_s)
        self.cpu_share = cpu_share
        self._last_cost_ns = 0
        self.skipped = 0                      # refreshes the CPU budget refused
        self._index: dict[int, list[int]] = {}
        self._built_ns = 0
        self._info: dict[int, tuple[float, dict]] = {}  # pid → (read at, last known info), kept after exit
        # inode → pids once resolved, kept across rebuilds: a listener's later events (say, SYNs that
        # race its close) are still named after its process has let go of the fd.
        self._resolved: dict[int, list[int]] = {}
        self._hot: OrderedDict[int, None] = OrderedDict()   # pids that owned the latest sockets resolved
        self._recent: dict[int, list[int]] = {}             # the sockets of those, at the last look
        self.rebuilds = 0

    def _rebuild(self) -> None:
        self._index = self._scan(int(e.name) for e in os.scandir("/proc") if e.name.isdigit())
        self._built_ns = time.monotonic_ns()
        self.rebuilds += 1

    @staticmethod
    def _scan(pids) -> dict[int, list[int]]:
        """socket inode → pids, from the fd links of these processes."""
        index: dict[int, list[int]] = {}
        my_pid = os.getpid()
        for pid in pids:
            if pid == my_pid:
                continue
            fd_dir = f"/proc/{pid}/fd"
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
                    index.setdefault(int(target[8:-1]), []).append(pid)
        return index

    def known(self, inode: int) -> bool:
        return inode in self._resolved or inode in self._index or inode in self._recent

    def refresh_for(self, inodes_and_times: list[tuple[int, int]]) -> None:
        """Rebuild the index once if any of these sockets (inode, event CLOCK_MONOTONIC ns) may be
        newer than it. Called once per batch of events, never per event, so a storm of sockets
        that have no owner any more costs one /proc scan per batch, not one per event."""
        newest = max((t for ino, t in inodes_and_times if ino and not self.known(ino)), default=None)
        if newest is None or self._built_ns > newest:
            return
        # The likeliest owners of new sockets are the processes that owned the last ones (the client
        # and server of a storm): their fds first, a few readlinks instead of every fd on the host.
        if self._hot:
            self._recent = self._scan(list(self._hot))
            if all(self.known(ino) for ino, t in inodes_and_times if ino and t >= self._built_ns):
                return
        now = time.monotonic_ns()
        if now < self._built_ns + int(self._last_cost_ns / self.cpu_share):
            self.skipped += 1
            return
        wait_ns = self._built_ns + self.min_gap_ns - now
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)
        started = time.monotonic_ns()
        self._rebuild()
        self._last_cost_ns = time.monotonic_ns() - started

    def owners(self, inode: int) -> list[int]:
        """Pids holding socket `inode` as of the last index (see refresh_for)."""
        if not inode:
            return []
        pids = self._resolved.get(inode) or self._index.get(inode) or self._recent.get(inode)
        if pids:
            self._resolved[inode] = pids
            if len(self._resolved) > 65536:
                self._resolved.pop(next(iter(self._resolved)))
            for pid in pids:
                self._hot[pid] = None
                self._hot.move_to_end(pid)
            while len(self._hot) > HOT_OWNERS:
                self._hot.popitem(last=False)
        return sorted(set(pids or []))

    def info(self, pid: int) -> dict | None:
        """Process info, remembered: a process that exits right after its socket's event is still
        named. Read again once INFO_TTL_S old (a storm names one process thousands of times)."""
        now = time.monotonic()
        cached = self._info.get(pid)
        if cached is None or now - cached[0] >= INFO_TTL_S:
            # A process that is gone keeps what was known of it (or nothing) until the next look.
            cached = self._info[pid] = (now, process_info(pid) or (cached[1] if cached else None))
            if len(self._info) > 4096:
                self._info.pop(next(iter(self._info)))
        return dict(cached[1]) if cached[1] else None


class PortListeners:
    """(netns, local address, port) → inodes of the sockets listening there: an inet_diag dump of the
    netns' listeners, made through /proc/<pid>/ns/net of any process in that netns: far cheaper than
    reading /proc/PID/net/tcp{,6}, which walks every bucket of the kernel's socket hashes."""

    def __init__(self, min_gap_s: float = 0.1):
        self.min_gap_s = min_gap_s
        self._pid_in: dict[int, int] = {}                                  # netns inode → a pid in it
        # netns inode → (dump time, rows (address, port, inode), matches by (address, port))
        self._listeners: dict[int, tuple[float, list[tuple[str, int, int]], dict]] = {}
        self.dumps = 0

    @staticmethod
    def _netns_of(pid: int) -> int | None:
        try:
            return int(os.readlink(f"/proc/{pid}/ns/net")[5:-1])      # "net:[4026532345]"
        except (OSError, ValueError):
            return None

    def _pid_in_netns(self, netns: int, hint: int) -> int | None:
        for pid in (self._pid_in.get(netns), hint):
            if pid and self._netns_of(pid) == netns:
                self._pid_in[netns] = pid
                return pid
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and self._netns_of(int(entry.name)) == netns:
                self._pid_in[netns] = int(entry.name)
                return int(entry.name)
        return None

    def inodes(self, netns: int, addr: str, port: int, pid_hint: int = 0) -> list[int]:
        now = time.monotonic()
        cached = self._listeners.get(netns)
        hits = self._match(cached, addr, port) if cached else []
        if not hits and (cached is None or now - cached[0] >= self.min_gap_s):
            pid = self._pid_in_netns(netns, pid_hint)
            if pid is None:
                self._listeners[netns] = (now, [], {})     # no process left in it: not rescanned before min_gap_s
                return []
            rows = [(lst.addr, lst.port, lst.inode) for lst in listeners_in(f"/proc/{pid}/ns/net")]
            self.dumps += 1
            cached = self._listeners[netns] = (now, rows, {})
            hits = self._match(cached, addr, port)
        return hits

    @staticmethod
    def _match(cached, addr: str, port: int) -> list[int]:
        """match_listeners() against one dump, remembered per address until the next dump."""
        _, rows, matches = cached
        hits = matches.get((addr, port))
        if hits is None:
            hits = match_listeners(rows, addr, port)
            if len(matches) < 4096:
                matches[(addr, port)] = hits
        return hits


def match_listeners(rows: list[tuple[str, int, int]], addr: str, port: int) -> list[int]:
    """Inodes of the listeners among `rows` (address, port, inode) that take connections to addr:port:
    bound there or to a wildcard (a dual-stack [::] listener takes IPv4 too)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return []
    out = []
    for a, p, inode in rows:
        if p != port:
            continue
        bound = ipaddress.ip_address(a)
        if isinstance(bound, ipaddress.IPv6Address) and bound.ipv4_mapped:
            bound = bound.ipv4_mapped
        if bound == ip or bound.is_unspecified:
            out.append(inode)
    return out


class NetnsNames:
    """netns inode → `ip netns` name (from /run/netns bind mounts), re-read when an unknown inode shows up."""

    def __init__(self, min_interval: float = 1.0):
        self.min_interval = min_interval
        self._names: dict[int, str] = {}
        self._read_at = 0.0
        self.host_netns = os.stat(host_netns_path()).st_ino

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


def resolve_netns(value: str) -> int:
    """A --netns value → netns inode: a number, `host`, an `ip netns` name, or a path such as
    /proc/PID/ns/net. ValueError with a one-line reason otherwise."""
    value = value.strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    if value == "host":
        path = host_netns_path()
    elif "/" in value:
        path = value
    else:
        path = f"/run/netns/{value}"
    try:
        return os.stat(path).st_ino
    except OSError:
        raise ValueError(f"no network namespace {value!r} (an inode number, `host`, a name from "
                         f"`ip netns list`, or a path like /proc/PID/ns/net)") from None


class Attributor:
    def __init__(self, context_known: bool = True):
        self.context_known = context_known
        self.sockets = SocketOwners()
        self.netns = NetnsNames()
        self.listeners = PortListeners()
        self.cgroups = Cgroups()
        self._tasks: dict[tuple, tuple[float, dict]] = {}

    LISTENER_EVENTS = ("syn_dropped", "ack_dropped", "syn_cookie")

    def _listener_event(self, ev: Event) -> bool:
        return ev.kind in self.LISTENER_EVENTS or (ev.queues is not None and ev.state == "LISTEN")

    def needs_owner(self, ev: Event) -> bool:
        return not (self.context_known and not ev.softirq and not self._listener_event(ev))

    def decided_by(self, softirq: bool, owner_pid: int, sock_ino: int) -> str | None:
        """For a reset (no listener queues), what names its process, where the record alone decides
        it: "task" (process context), "recorded_owner" (seen calling connect()), "port_listener" (no
        socket: the local port's listener, or nobody); None where the socket's fd holder is looked
        up per socket. The fast path's templates (tracer/fastpath.py) rest on this."""
        if self.context_known and not softirq:
            return "task"
        if owner_pid:
            return "recorded_owner"
        if sock_ino:
            return None
        return "port_listener"

    def prepare(self, events: list[Event]) -> None:
        """Before attributing a batch: one index refresh if any of its sockets may be new."""
        self.sockets.refresh_for([(ev.sock_ino, ev.ktime_ns) for ev in events
                                  if self.needs_owner(ev) and not ev.owner_pid])

    def attribute(self, ev: Event) -> None:
        """ev.netns_name and ev.process. Process dicts may be shared between events (one per process
        and source, a few seconds): nothing downstream changes them."""
        ev.netns_name = self.netns.name(ev.netns)
        if not self.needs_owner(ev):
            ev.process = self._task(ev)
            return
        ev.process = self._process(ev)
        if ev.process is not None:
            ev.process["cgroup"], ev.process["container"] = self.cgroups.of(ev.process["pid"])

    def _task(self, ev: Event) -> dict:
        """The task on the CPU, which did it (process context): one dict per process for a while."""
        key = (ev.task_pid, ev.task_comm, ev.task_uid)
        now = time.monotonic()
        hit = self._tasks.get(key)
        if hit is None or now - hit[0] >= self.cgroups.ttl:
            cgroup, container = self.cgroups.of(ev.task_pid)
            hit = self._tasks[key] = (now, {"pid": ev.task_pid, "comm": ev.task_comm, "uid": ev.task_uid,
                                            "source": "task", "cgroup": cgroup, "container": container})
            if len(self._tasks) > 4096:
                self._tasks.pop(next(iter(self._tasks)))
        return hit[1]

    def _process(self, ev: Event) -> dict | None:
        """Who owns the socket of an event the task on the CPU did not cause."""
        listener_event = self._listener_event(ev)
        if ev.owner_pid:
            # Seen by the BPF program calling listen() (a listener's drop is the listening process's
            # problem, whoever was on the CPU) or connect() (a client socket): named even if it has
            # closed the socket or exited since.
            return self.recorded_owner(ev.owner_pid, ev.owner_comm, "listener_owner" if listener_event else "socket_owner")
        source = "listener_owner" if listener_event else "socket_owner"
        found = self._owner(self.sockets.owners(ev.sock_ino), source)
        if found or listener_event:
            return found
        # The socket is already closed (or was never accept()ed): a server-side connection is still
        # the business of the process listening on its local port. A client's ephemeral port, or a
        # port nobody listens on (no_listener), finds nobody.
        inodes = self.listeners.inodes(ev.netns, ev.local_addr, ev.local_port, ev.task_pid)
        return self._owner(self._current_owners(inodes), "port_listener") if inodes else None

    def recorded_owner(self, pid: int, comm: str, source: str) -> dict:
        """A process the BPF programs saw calling listen()/connect() on the socket: as /proc knows it
        now, or by the name the kernel recorded (it may have exited, or exec'd since)."""
        info = self.sockets.info(pid) or {"pid": pid, "comm": comm, "uid": None}
        if info.get("comm") != comm and comm:
            info = {"pid": pid, "comm": comm, "uid": info.get("uid")}
        info["source"] = source
        return info

    def _current_owners(self, inodes: list[int]) -> list[int]:
        """Owners of long-lived sockets (listeners) looked up now: one index refresh at most."""
        self.sockets.refresh_for([(inode, time.monotonic_ns()) for inode in inodes])
        return [pid for inode in inodes for pid in self.sockets.owners(inode)]

    def owner_of_socket(self, inode: int, source: str) -> dict | None:
        """The process holding socket `inode` (as of the last index), with its cgroup and container."""
        found = self._owner(self.sockets.owners(inode), source)
        if found is not None:
            found["cgroup"], found["container"] = self.cgroups.of(found["pid"])
        return found

    def _owner(self, pids: list[int], source: str) -> dict | None:
        for pid in sorted(set(pids)):
            info = self.sockets.info(pid)
            if info:
                info["source"] = source
                return info
        return None
