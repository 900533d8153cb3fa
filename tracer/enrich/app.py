"""The application's side of an event (bpf/app.bpf.c): the system calls that failed in the process
shortly before it reset a connection, and how a listener whose accept queue overflowed was accepting.

    AppErrors.note_failures(ev)  an RST whose process had failures in the window: `app_errors` (oldest
                                 first) and an explanation that starts with the most telling one
    AppErrors.note_accept(ev)    an accept-queue drop: its listener's `accept` block (accept() calls,
                                 failures, SYN arrivals) and which of three causes explains the full
                                 queue: not accepting, accept() failing, or accepting slower than
                                 connections arrive

The kernel keeps the last few failures per process and one activity entry per traced listener; both
are read here when an event needs them, so nothing of a process (no path) leaves the kernel without
an event of that process.
"""
from __future__ import annotations

import errno
import functools
import os
import pwd
import time
from types import SimpleNamespace

from ..events.decode import Event
from ..kernel.hooks import APP_SYSCALL_IDS

SYSCALL_NAMES = {i: name for name, i in APP_SYSCALL_IDS.items()}
PATH_UNREAD = 0x1                   # bpf/app.bpf.c APP_F_PATH_UNREAD

# How telling a failure is, as the cause of an abort: resource and permission errors first; a path
# that does not exist last (every program probes for files that may not be there).
TELLING = {name: 0 for name in ("EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "EFBIG", "EIO", "EMFILE", "ENFILE",
                                "ENOMEM", "ENOBUFS")}
TELLING.update({name: 2 for name in ("ENOENT", "EEXIST", "ENOTDIR", "EISDIR", "ENOTEMPTY", "ENOTSOCK", "EBADF")})
HINTS = {
    "EACCES": "its user (uid {uid}) may not use that path",
    "EPERM": "its user (uid {uid}) may not use that path",
    "EROFS": "that filesystem is read-only",
    "ENOSPC": "that filesystem is full",
    "EDQUOT": "its user's disk quota is used up",
    "EMFILE": "the process is out of file descriptors (RLIMIT_NOFILE)",
    "ENFILE": "the host is out of file descriptors (fs.file-max)",
    "ECONNREFUSED": "nothing listens where it connects",
}

# A listener whose owner made no accept() call for this long while its accept queue is full is not
# accepting; a failure this recent, with no accept since, is why it is full.
NOT_ACCEPTING_S = 1.0
FAILING_RECENT_S = 5.0
ACTIVITY_REFRESH_S = 0.02       # a listener's entry is read at most this often (a burst of drops: once)


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, f"errno {err}")


def _call_text(f: dict) -> str:
    if f["path"] is not None:
        return f'{f["syscall"]}("{f["path"]}")'
    if f["fd"] is not None:
        return f'{f["syscall"]}(fd {f["fd"]})'
    return f'{f["syscall"]}()'


def most_telling(failures: list[dict]) -> dict:
    """The failure that best explains an abort: the most telling errno, the latest among equals."""
    return min(reversed(failures), key=lambda f: TELLING.get(f["errno"], 1))


def failure_records(raw, ktime_ns: int, window_ns: int) -> list[dict]:
    """A process's kept failures (struct app_failures) in [ktime_ns - window_ns, ktime_ns], oldest first."""
    out = []
    for f in raw.f:
        if not f.ns or f.ns > ktime_ns or ktime_ns - f.ns > window_ns:
            continue
        path = None
        if f.path_len:
            path = bytes(f.path).split(b"\0", 1)[0].decode(errors="replace")
        out.append({
            "syscall": SYSCALL_NAMES.get(f.call, f"syscall {f.call}"),
            "errno": errno_name(f.err),
            "error": os.strerror(f.err),
            "path": path,
            "path_unreadable": bool(f.flags & PATH_UNREAD),
            "fd": f.fd if f.fd >= 0 else None,
            "tid": f.tid,
            "before_ms": round((ktime_ns - f.ns) / 1e6, 3),
            "_ns": f.ns,
        })
    out.sort(key=lambda f: f["_ns"])
    for f in out:
        del f["_ns"]
    return out


def explain_failure(who: str, f: dict, uid: int | None) -> str:
    """`openat("/x/proxy_temp/1") failed with EACCES (Permission denied) in nginx (pid 9920) 0.4 ms
    before — its user (uid 65534, nobody) may not use that path`"""
    text = f"{_call_text(f)} failed with {f['errno']} ({f['error']}) in {who} {f['before_ms']:g} ms before"
    hint = HINTS.get(f["errno"])
    return f"{text} — {hint.format(uid=_user(uid))}" if hint else text


@functools.lru_cache(maxsize=256)
def _user(uid: int | None) -> str:
    if uid is None:
        return "?"
    try:
        return f"{uid}, {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return str(uid)


class AppErrors:
    def __init__(self, program, window_s: float):
        self.program = program
        self.window_ns = int(window_s * 1e9)
        self._activity: dict[tuple[int, int], tuple[float, object]] = {}     # (netns, port) → (read at, entry)
        self.started_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)

    # -- the pipeline's two calls ----------------------------------------------------------------
    def note_accept(self, ev: Event) -> None:
        """Before the explanation: an accept-queue event gets its listener's `accept` block, and the
        cause for reasons.explain_queue() to name."""
        if ev.queues and ev.reason == "accept_queue_full":
            block = self.accept_block(ev.netns, ev.local_port, ev.ktime_ns, with_cause=True)
            ev.extra["accept_cause"] = block.pop("cause_text")
            ev.extra["accept"] = block

    def note_failures(self, ev: Event) -> None:
        """After the explanation: an RST whose process had failures in the window (the kernel counted
        them in the record) gets its `app_errors`, and the most telling one heads its explanation."""
        if ev.extra.get("app_errors_kept"):
            self._attach_failures(ev)

    # -- failed syscalls before an RST -------------------------------------------------------
    def _attach_failures(self, ev: Event) -> None:
        pid = ev.owner_pid if ev.softirq else ev.task_pid
        raw = self.program.app_failures(pid)
        if raw is None:
            return
        failures = failure_records(raw, ev.ktime_ns, self.window_ns)
        if not failures:
            return
        ev.extra["app_errors"] = failures
        p = ev.process or {}
        comm = p.get("comm") if p.get("pid") == pid else None
        who = f"{comm or (ev.task_comm if not ev.softirq else ev.owner_comm) or '?'} (pid {pid})"
        uid = p.get("uid") if p.get("pid") == pid else (None if ev.softirq else ev.task_uid)
        ev.explanation = f"{explain_failure(who, most_telling(failures), uid)}; {ev.explanation}"

    # -- a listener's accept() behaviour ------------------------------------------------------
    def _activity_of(self, netns: int, port: int):
        """The kernel's entry for (netns, port), read again when the last read is older than
        ACTIVITY_REFRESH_S: a burst of drops on one listener reads it once."""
        now = time.monotonic()
        hit = self._activity.get((netns, port))
        if hit is None or now - hit[0] >= ACTIVITY_REFRESH_S:
            if len(self._activity) > 4096:
                self._activity.clear()
            per_cpu = self.program.listen_activity_of(netns, port)
            hit = self._activity[(netns, port)] = (now, merge_cpus(per_cpu) if per_cpu else None)
        return hit[1]

    def accept_block(self, netns: int, port: int, now_ns: int | None = None, with_cause: bool = False) -> dict:
        """What the kernel saw of (netns, port)'s accept() calls and SYNs since rsttrace started (or the
        listener's listen()), as read now — a moment after an event's time `now_ns`."""
        a = self._activity_of(netns, port)
        if now_ns is None:
            now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        watching = max(0, now_ns - self.started_ns)
        block = {
            "calls": 0, "accepted": 0, "last_call_s_ago": None, "last_caller": None, "accepts_per_s": None,
            "syns": 0, "syns_per_s": None, "failed": 0, "errors": {}, "last_error": None,
            "rlimit_nofile": None, "open_fds": None, "watching_s": round(watching / 1e9, 3),
        }
        if a is not None:
            comm = bytes(a.comm).split(b"\0", 1)[0].decode(errors="replace")
            block.update({
                "calls": a.calls, "accepted": a.accepted,
                "last_call_s_ago": round(max(0, now_ns - a.last_call_ns) / 1e9, 3) if a.last_call_ns else None,
                "last_caller": {"pid": a.tgid, "comm": comm} if a.tgid else None,
                "accepts_per_s": _rate(a.accepted, a.first_accept_ns, a.last_accept_ns),
                "syns": a.syns, "syns_per_s": _rate(a.syns, a.first_syn_ns, a.last_syn_ns),
                "failed": a.failed,
                "errors": errors_by_errno(a),
                "last_error": errno_name(a.last_err) if a.failed else None,
                "rlimit_nofile": a.nofile if a.emfile else None,
                "open_fds": (a.open_fds or None) if a.emfile else None,
            })
        if with_cause:
            block["cause"], block["cause_text"] = accept_cause(block, a, now_ns)
        return block


SUMMED = ("calls", "accepted", "syns", "failed", "emfile", "enfile", "enomem")


def merge_cpus(per_cpu: list) -> SimpleNamespace:
    """One listener's entry from its per-CPU ones (bpf/app.bpf.c struct listen_activity): the counts
    added, the latest of the last times, the earliest of the first ones; the last failure's errno
    and limits, and the last caller, from the CPU that saw them last."""
    out = SimpleNamespace(**{name: sum(getattr(c, name) for c in per_cpu) for name in SUMMED})
    for name in ("last_call_ns", "last_accept_ns", "last_syn_ns", "last_fail_ns"):
        setattr(out, name, max(getattr(c, name) for c in per_cpu))
    for name in ("first_accept_ns", "first_syn_ns"):
        setattr(out, name, min((getattr(c, name) for c in per_cpu if getattr(c, name)), default=0))
    failed = max(per_cpu, key=lambda c: c.last_fail_ns)
    out.last_err, out.nofile, out.open_fds = failed.last_err, failed.nofile, failed.open_fds
    caller = max(per_cpu, key=lambda c: c.last_call_ns)
    out.tgid, out.comm = caller.tgid, bytes(caller.comm)
    return out


def errors_by_errno(a) -> dict[str, int]:
    """A listener's accept() failures: EMFILE, ENFILE, ENOMEM (with ENOBUFS), the rest as `other`."""
    named = {"EMFILE": a.emfile, "ENFILE": a.enfile, "ENOMEM": a.enomem}
    out = {name: n for name, n in named.items() if n}
    other = a.failed - sum(named.values())
    if other > 0:
        out["other"] = other
    return out


def _rate(n: int, first_ns: int, last_ns: int) -> float | None:
    """Events per second between the first and the last seen (None: fewer than two)."""
    if n < 2 or last_ns <= first_ns:
        return None
    return round((n - 1) / ((last_ns - first_ns) / 1e9), 2)


def accept_cause(block: dict, a, now_ns: int) -> tuple[str | None, str | None]:
    """Why a listener's accept queue is full: accept() failing, not accepting, or accepting slower than
    connections arrive — (cause, the clause the explanation ends with)."""
    caller = block["last_caller"]
    who = f"{caller['comm']} (pid {caller['pid']})" if caller else "its owner"
    if a is not None and a.failed and a.last_fail_ns >= a.last_accept_ns and now_ns - a.last_fail_ns < FAILING_RECENT_S * 1e9:
        err = block["last_error"]
        if a.emfile:
            limits = ", ".join(part for part in (
                f"RLIMIT_NOFILE {block['rlimit_nofile']}" if block["rlimit_nofile"] else "",
                f"{block['open_fds']} fds open" if block["open_fds"] is not None else "") if part)
            return "accept_failing", (f"accept() failed {a.emfile} times with EMFILE ({limits}) in {who}: it is out of "
                                      f"file descriptors, so every accept() fails and the queue stays full — raise its "
                                      f"limit (ulimit -n, LimitNOFILE=) or find what holds them")
        return "accept_failing", f"accept() failed {a.failed} times in {who}, the last with {err} ({os.strerror(a.last_err)})"
    if a is None or not a.last_call_ns:
        return "not_accepting", (f"no accept() call on it since rsttrace started {block['watching_s']:.1f} s ago: the "
                                 f"server is not accepting (stuck, blocked elsewhere, never calls accept, or accepts "
                                 f"through io_uring, which rsttrace does not see)")
    if now_ns - a.last_call_ns > NOT_ACCEPTING_S * 1e9:
        return "not_accepting", (f"{who} last called accept() {block['last_call_s_ago']:.1f} s ago: it is not "
                                 f"accepting (stuck, or blocked elsewhere)")
    accepts, syns = block["accepts_per_s"], block["syns_per_s"]
    if accepts is not None and syns is not None:
        return "accepting_slowly", (f"{who} accepts {accepts:g}/s while SYNs arrive at {syns:g}/s (since rsttrace "
                                    f"started): it accepts slower than connections arrive — more workers or threads")
    return "accepting_slowly", f"{who} is accepting, slower than connections arrive"
