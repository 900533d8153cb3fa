"""Listener sampler: every listener on the traced ports, in every known network namespace, with its
accept queue and drop counter as the kernel reports them (inet_diag), plus the netns counters that
rsttrace's own event counts are reconciled with.

This runs beside the event pipeline, without BPF: it is also what still counts drops that no per-event
hook could see (a listener that predates rsttrace and never queued a connection since).
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..kernel import listener_poke
from . import counters

LISTENER_SCAN_INTERVAL = 10.0 # seconds between looks for listeners that predate rsttrace (all netns)
CLONE_NEWNET = 0x40000000
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
INET_DIAG_SKMEMINFO = 7
SK_MEMINFO_DROPS = 8

NS_GET_ID = (2 << 30) | (8 << 16) | (0xB7 << 8) | 0xD      # _IOR(NSIO, 0xd, __u64), Linux 6.12+ for a netns

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Listener:
    family: str
    addr: str
    port: int
    accept_qlen: int
    accept_qmax: int
    inode: int
    drops: int


# Where a netns's baseline comes from (the reconciliation's `baseline`).
START, CREATED_AFTER_START, LATE = "start", "created_after_start", "late"


@dataclass
class NetnsState:
    inode: int
    name: str | None
    ns_path: str
    diag: socket.socket | None = None
    baseline: dict[str, int] = field(default_factory=dict)
    latest: dict[str, int] = field(default_factory=dict)
    origin: str = START
    seen_before: dict[str, int] = field(default_factory=dict)   # LATE: rsttrace's events before the baseline
    gone: bool = False              # could not be entered any more: `latest` is the last read
    somaxconn: int | None = None
    listeners: list[Listener] = field(default_factory=list)
    prev_drops: dict[tuple, tuple[int, float]] = field(default_factory=dict)
    drop_rates: dict[tuple, float] = field(default_factory=dict)


def host_netns_path() -> str:
    """The host's netns: init's, or — where init's namespaces are hidden (some sandboxes refuse even
    root) — rsttrace's own, which is the host's when rsttrace runs as documented."""
    try:
        os.stat("/proc/1/ns/net")
        return "/proc/1/ns/net"
    except OSError:
        return "/proc/self/ns/net"


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def netns_cookie(path: str) -> int | None:
    """The netns's cookie (net_cookie: unique while the machine runs, never reused, unlike the
    inode), or None where the kernel has no NS_GET_ID for a netns."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, NS_GET_ID, buf)
        return struct.unpack("=Q", buf)[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def netns_by_process() -> dict[int, str]:
    """inode → /proc/PID/ns/net of one process in it, for every netns that has a process."""
    paths: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            path = f"/proc/{entry.name}/ns/net"
            try:
                paths.setdefault(os.stat(path).st_ino, path)
            except OSError:
                continue
    return paths


def netns_alive() -> set[int]:
    """The inodes of every netns that can be reached now: the host's, every `ip netns` name, every
    one with a process."""
    alive = set(netns_by_process())
    for path in [host_netns_path(), *(e.path for e in _scandir("/run/netns"))]:
        try:
            alive.add(os.stat(path).st_ino)
        except OSError:
            continue
    return alive


def _scandir(path: str) -> list[os.DirEntry]:
    try:
        return list(os.scandir(path))
    except OSError:
        return []


def _diag_request(family: int) -> bytes:
    # struct inet_diag_req_v2 + struct inet_diag_sockid (zeroed: all sockets)
    req = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 1 << (INET_DIAG_SKMEMINFO - 1), 1 << TCP_LISTEN)
    req += b"\0" * 48
    return struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req


def dump_listeners(sock: socket.socket, ports: set[int] | None) -> list[Listener]:
    """TCP listeners of the socket's netns (IPv4 and IPv6) via inet_diag."""
    out = []
    for family in (socket.AF_INET, socket.AF_INET6):
        sock.send(_diag_request(family))
        done = False
        while not done:
            data = sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, msg_type = struct.unpack_from("=IH", data, off)
                if length < 16:
                    done = True
                    break
                if msg_type in (NLMSG_DONE, NLMSG_ERROR):
                    done = True
                    break
                msg = data[off + 16:off + length]
                listener = _parse_diag_msg(msg)
                if listener and (not ports or listener.port in ports):
                    out.append(listener)
                off += (length + 3) & ~3
    return out


def listeners_in(ns_path: str) -> list[Listener]:
    """Every TCP listener of the netns at `ns_path` (e.g. /proc/PID/ns/net), from a short-lived thread
    that enters it (setns() changes only the calling thread). [] if the netns cannot be entered."""
    found: list[Listener] = []

    def work():
        try:
            _setns(ns_path)
            with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
                found.extend(dump_listeners(sock, None))
        except OSError:
            pass
    t = threading.Thread(target=work, name="rsttrace-netns-listeners", daemon=True)
    t.start()
    t.join(timeout=5)
    return found


def listeners_everywhere(ports: set[int]) -> dict[tuple[int, int], list[int]]:
    """(netns inode, port) → socket inodes of the TCP listeners on these ports in every network
    namespace that has a process (a listening socket is held by one), as inet_diag reports them."""
    found: dict[tuple[int, int], list[int]] = {}
    for netns, path in netns_by_process().items():
        for lst in listeners_in(path):
            if lst.port in ports:
                found.setdefault((netns, lst.port), []).append(lst.inode)
    return found


def _parse_diag_msg(msg: bytes) -> Listener | None:
    if len(msg) < 72:
        return None
    fam, state = msg[0], msg[1]
    sport = struct.unpack_from("!H", msg, 4)[0]
    src = msg[8:24]
    rqueue, wqueue, _uid, inode = struct.unpack_from("=IIII", msg, 56)
    addr = socket.inet_ntop(socket.AF_INET6 if fam == socket.AF_INET6 else socket.AF_INET,
                            src if fam == socket.AF_INET6 else src[:4])
    drops = 0
    off = 72
    while off + 4 <= len(msg):
        rta_len, rta_type = struct.unpack_from("=HH", msg, off)
        if rta_len < 4:
            break
        if rta_type == INET_DIAG_SKMEMINFO and rta_len >= 4 + 4 * (SK_MEMINFO_DROPS + 1):
            drops = struct.unpack_from("=I", msg, off + 4 + 4 * SK_MEMINFO_DROPS)[0]
        off += (rta_len + 3) & ~3
    if state != TCP_LISTEN:
        return None
    return Listener("ipv6" if fam == socket.AF_INET6 else "ipv4", addr, sport, rqueue, wqueue, inode, drops)


class ListenerSampler:
    """Samples listeners and netns counters from its own thread (setns() affects only that thread)."""

    def __init__(self, ports: list[int], interval: float = 0.5, netns: list[int] | None = None,
                 seen_in: Callable[[int], dict[str, int]] | None = None):
        self.ports = set(ports)
        # rsttrace's counts in a netns so far (inode → event kind → count): kept with a late baseline
        self.seen_in = seen_in or (lambda inode: {})
        # Every netns at start (inode → cookie, None where the kernel does not say) and the counters
        # of those no sampler pass entered then: a netns met later is told from these.
        self.at_start: dict[int, int | None] = {}
        self.start_counters: dict[int, dict[str, int]] = {}
        self._starting = True
        self.only_netns = set(netns or ())       # --netns: watch these namespaces only (empty: all)
        self.interval = interval
        self.netns: dict[int, NetnsState] = {}
        self._lock = threading.Lock()
        self._wanted: dict[int, tuple[str | None, str]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._own_ns = "/proc/thread-self/ns/net"
        self.errors: list[str] = []

    # -- which namespaces ------------------------------------------------------------------
    def add_known_namespaces(self) -> None:
        """The host's netns and every `ip netns` name: watched, baselines taken at start."""
        self.watch_path(host_netns_path(), "host")
        for entry in _scandir("/run/netns"):
            self.watch_path(entry.path, entry.name)
        for inode, (_, path) in self._wanted.items():
            self.at_start[inode] = netns_cookie(path)

    def _note_other_namespaces(self) -> None:
        """Every other netns with a process: its counters read now, for when an event first leads
        there. In the sampler's thread before its first pass: a host with hundreds of containers
        does not wait for this to be attached."""
        for inode, path in netns_by_process().items():
            if inode in self.at_start or (self.only_netns and inode not in self.only_netns):
                continue
            self.at_start[inode] = netns_cookie(path)
            read = counters.read(path.replace("/ns/net", "/net"))
            if read:
                self.start_counters[inode] = read

    def watch_path(self, path: str, name: str | None) -> None:
        try:
            inode = os.stat(path).st_ino
        except OSError:
            return
        if self.only_netns and inode not in self.only_netns:
            return
        with self._lock:
            self._wanted.setdefault(inode, (name, path))

    def watch_pid(self, pid: int) -> None:
        """A netns met in an event: reach it through a process that lives in it."""
        self.watch_path(f"/proc/{pid}/ns/net", None)

    # -- thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self.sample_once()              # baselines before the first event can be counted
        self._starting = False
        self._thread = threading.Thread(target=self._run, name="rsttrace-listeners", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """The thread stops; a last sample_once() may follow (at exit), then close()."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def close(self) -> None:
        for st in self.netns.values():
            if st.diag:
                st.diag.close()

    def _run(self) -> None:
        self._note_other_namespaces()
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            while not self._stop.wait(self.interval):
                self._sample(home)
        finally:
            os.close(home)

    def sample_once(self) -> None:
        """One synchronous sample from a short-lived thread (used at start and at exit)."""
        def work():
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._sample(home)
            finally:
                os.close(home)
        t = threading.Thread(target=work, daemon=True)
        t.start()
        t.join(timeout=10)

    def _sample(self, home_fd: int) -> None:
        with self._lock:
            wanted = dict(self._wanted)
        for inode, (name, path) in wanted.items():
            try:
                _setns(path)
                st = self.netns.get(inode)
                if st is None:
                    st = NetnsState(inode, name, path)
                    st.diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
                    self._set_baseline(st, counters.read("/proc/thread-self/net"), netns_cookie(path))
                    self.netns[inode] = st
                st.latest = counters.read("/proc/thread-self/net")
                try:
                    with open("/proc/sys/net/core/somaxconn") as f:
                        st.somaxconn = int(f.read())
                except OSError:
                    pass
                listeners = dump_listeners(st.diag, self.ports)
                now = time.monotonic()
                prev_drops, drop_rates = {}, {}     # only listeners that still exist: bounded over long runs
                for lst in listeners:
                    key = (lst.addr, lst.port, lst.inode)
                    prev = st.prev_drops.get(key)
                    if prev and now > prev[1]:
                        drop_rates[key] = (lst.drops - prev[0]) / (now - prev[1])
                    prev_drops[key] = (lst.drops, now)
                st.prev_drops, st.drop_rates = prev_drops, drop_rates
                st.listeners = listeners
            except OSError as err:
                if len(self.errors) < 20:
                    self.errors.append(str(err))
                with self._lock:
                    self._wanted.pop(inode, None)     # the netns is gone (or unreachable)
                st = self.netns.get(inode)
                if st is not None:
                    st.gone = True                   # its last read stands
            finally:
                _libc.setns(home_fd, CLONE_NEWNET)

    def _set_baseline(self, st: NetnsState, now: dict[str, int], cookie: int | None) -> None:
        """Counted from start where that was read; from 0 for a netns made after start (its counters
        began at 0); else from now, keeping what rsttrace had already seen there."""
        same = st.inode in self.at_start and (cookie is None or self.at_start[st.inode] in (None, cookie))
        if self._starting:
            st.baseline, st.origin = now, START
        elif same and st.inode in self.start_counters:
            st.baseline, st.origin = self.start_counters[st.inode], START
        elif not same:
            st.baseline, st.origin = {}, CREATED_AFTER_START
        else:
            st.baseline, st.origin, st.seen_before = now, LATE, dict(self.seen_in(st.inode))

    # -- views -----------------------------------------------------------------------------
    def snapshot(self, owner_of) -> list[dict]:
        """Listener rows for the `listeners` record; owner_of(netns inode, port, socket inode) →
        process dict or None."""
        rows = []
        for st in list(self.netns.values()):
            for lst in st.listeners:
                somaxconn = st.somaxconn
                binding = None
                if somaxconn is not None:
                    binding = "somaxconn" if lst.accept_qmax == somaxconn else "listen_backlog"
                rows.append({
                    "netns": {"inode": st.inode, "name": st.name},
                    "local": {"addr": lst.addr, "port": lst.port},
                    "process": owner_of(st.inode, lst.port, lst.inode),
                    "accept_qlen": lst.accept_qlen,
                    "accept_qmax": lst.accept_qmax,
                    "backlog": None,
                    "somaxconn": somaxconn,
                    "binding_limit": binding,
                    "syn_qlen": None,
                    "syn_qmax": lst.accept_qmax,
                    "drops": lst.drops,
                    "drops_per_s": round(st.drop_rates.get((lst.addr, lst.port, lst.inode), 0.0), 2),
                })
        return rows


class ListenerTracking:
    """What the session does for listeners beside the sampler: learn those that predate rsttrace into
    the BPF table (where the plan has the hooks for it), name each listener's owner, and turn the
    sampler's view into `listeners` records.

    program: the loaded programs (tracer/kernel/loader.py RstProgram); attributor: the event path's
    (its socket-owner index is shared, one /proc scan for both)."""

    def __init__(self, program, attributor, sampler: ListenerSampler | None, ports: list[int],
                 learning: bool, poking: bool):
        self.program = program
        self.attributor = attributor
        self.sampler = sampler
        self.ports = set(ports)
        self.learning = learning                  # sk_data_ready attached to learn older listeners
        self.poking = poking                      # sock_recv_length attached for the poke
        self.backlogs: dict[tuple[int, int], int] = {}     # (netns, port) → listen() backlog seen
        self._older: dict[tuple[int, int], list[int]] | None = None   # → socket inodes
        self._older_scanned_at = 0.0
        self._resolved: set[int] = set()
        self._owners: dict[tuple[int, int], tuple[int, str]] = {}     # recorded at listen()

    def observe(self, ev) -> None:
        """An attributed event: its process's netns joins the sampler's; a listener's backlog is noted."""
        if ev.netns not in self.sampler.netns and ev.process and ev.process.get("pid"):
            self.sampler.watch_pid(ev.process["pid"])
        if ev.queues and ev.queues.get("backlog") is not None:
            self.backlogs[(ev.netns, ev.local_port)] = ev.queues["backlog"]

    def tick(self, now: float) -> None:
        self._resolve_new()
        if self.learning:
            self._learn_older(now)

    def _learn_older(self, now: float) -> None:
        """Listeners that existed before rsttrace reach the BPF table only when they next queue a
        connection (sock:sk_data_ready, which fires for every socket receiving data on the host).
        Once every listener on the traced ports in every netns is known, that hook is detached: new
        listeners arrive through listen() (inet_sock_set_state)."""
        if self._older is None or now - self._older_scanned_at >= LISTENER_SCAN_INTERVAL:
            self._older = listeners_everywhere(self.ports)
            self._older_scanned_at = now
            if self.poking:
                self._poke_older()
        if self._older.keys() <= self.program.known_listeners().keys():
            self.program.stop_learning_listeners()
            self.learning = False

    def _poke_older(self) -> None:
        """One round, at start: a recv() on a copy of each unknown older listener's fd makes it pass
        through sock:sock_recv_length, where the BPF side learns it (tracer/kernel/listener_poke.py).
        Listeners that predate rsttrace all exist by the first scan (later ones call listen() while
        traced), so the hook goes after it; any listener the poke missed is left to sk_data_ready."""
        known = self.program.known_listeners().keys()
        inodes = [inode for key, found in self._older.items() if key not in known for inode in found]
        if inodes:
            now_ns = time.monotonic_ns()
            self.attributor.sockets.refresh_for([(inode, now_ns) for inode in inodes])
            for inode in inodes:
                for pid in self.attributor.sockets.owners(inode):
                    if listener_poke.poke(pid, inode):      # one owner's copy is enough
                        break
        self.program.stop_poke_hook()
        self.poking = False

    def _resolve_new(self) -> None:
        """Name each listener's owner as soon as the sampler sees it, before its first drop: by then the
        owner index may have just been rebuilt for another socket, and the process may be gone. The
        BPF programs saw most listeners' owners call listen(): only the others are looked up in
        /proc, once each (a look costs a scan of every fd on the host)."""
        if self.sampler is None:
            return
        current = {(st.inode, lst.port, lst.inode) for st in list(self.sampler.netns.values())
                   for lst in st.listeners}
        inodes = {inode for _, _, inode in current}
        self._resolved &= inodes           # forget closed listeners: bounded over long runs
        new = [(netns, port, inode) for netns, port, inode in current if inode not in self._resolved]
        if not new:
            return
        self._owners = self.program.known_listeners()
        unknown = [inode for netns, port, inode in new if not self._owners.get((netns, port), (0,))[0]]
        if unknown:
            self.attributor.sockets.refresh_for([(inode, time.monotonic_ns()) for inode in unknown])
        self._resolved.update(inode for _, _, inode in new)

    def rows(self) -> list[dict]:
        """The sampler's listeners with their owners, and the backlog their listen() asked for."""
        rows = self.sampler.snapshot(self._owner)
        for row in rows:
            backlog = self.backlogs.get((row["netns"]["inode"], row["local"]["port"]))
            if backlog is not None and row["somaxconn"] is not None:
                row["backlog"] = backlog
                row["binding_limit"] = "somaxconn" if backlog > row["somaxconn"] else "listen_backlog"
        return rows

    def _owner(self, netns: int, port: int, inode: int) -> dict | None:
        pid, comm = self._owners.get((netns, port), (0, ""))
        if pid:
            owner = self.attributor.recorded_owner(pid, comm, "listener_owner")
            owner["cgroup"], owner["container"] = self.attributor.cgroups.of(pid)
            return owner
        return self.attributor.owner_of_socket(inode, "listener_owner")
