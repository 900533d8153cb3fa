#!/usr/bin/python3
"""Three ways a listener's accept queue overflows, reproduced (run it inside a private netns).

A server process (forked, comm `srv-<mode>`) listens with a small backlog; the parent then connects
to it at a steady pace, keeps every client socket open, and finally prints one JSON line of facts.
The server differs only in how it (fails to) take connections off its accept queue:

    idle    listen() and never accept(): the queue fills at backlog+1 and stays full.
    slow    a blocking accept() every --accept-gap seconds (default 0.1), each accepted socket kept
            open: the queue drains at 1/gap per second, slower than the clients arrive.
    emfile  RLIMIT_NOFILE lowered to --nofile (default 64) and every fd below it used up: each
            accept() fails at once with EMFILE (the fd is allocated before the queue is looked at),
            so the process is "accepting" and the queue still fills — the classic fd-leak outage.

    python3 accept.py MODE ADDR PORT [--backlog N] [--rate R] [--seconds S] [--accept-gap G]
                                     [--nofile L] [--hold S2]

Clients: R non-blocking connects per second for S seconds (one socket each, no SO_LINGER), then
everything is kept open S2 more seconds (--hold) so that a tracer can look at the full queue, then
the clients are closed and the server is stopped (SIGTERM) and reports over a pipe. Every wait is
bounded: the server also stops itself (SIGALRM) S + S2 + a margin after it starts, and a parent
that dies takes the server with it (PR_SET_PDEATHSIG).

Facts (times are CLOCK_MONOTONIC ns): mode, server_pid, server_comm, backlog, port, connects_ns (each
client's connect()), connected (clients connected by the end: SO_ERROR 0 and a peer name),
accepts_ns (each successful accept() in the server), accept_calls (failed ones included),
accept_errors ({"EMFILE": n}, empty if none), rlimit_nofile and open_fds (emfile only: the limit, and
the fds the server had open at its first EMFILE; null otherwise), start_ns, end_ns.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import resource
import select
import signal
import socket
import sys
import time

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
MARGIN = 10.0                # seconds the server may outlive the scenario's planned end, at most
STARTUP = 5.0                # seconds the parent waits for the server to be listening


class Stop(Exception):
    """Raised in the server by SIGTERM (the parent is done) or SIGALRM (its own deadline)."""


def resolve(addr: str, port: int) -> tuple[int, tuple]:
    """Family and sockaddr of a numeric IPv4/IPv6 address (getaddrinfo also keeps a %scope)."""
    fam, _, _, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM,
                                                flags=socket.AI_NUMERICHOST)[0]
    return fam, sockaddr


def now() -> int:
    return time.monotonic_ns()


# -- the server (child process) --------------------------------------------------------------------

def on_stop(signum, frame):
    # One Stop only: a second signal during the report would cut it short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.setitimer(signal.ITIMER_REAL, 0)
    raise Stop


def close_strays(keep: set[int]) -> None:
    """Close fds inherited from whoever started us: in emfile mode the server must hold exactly the
    fds it counts, all of them below its new limit."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass                      # the listdir's own fd, already gone


def fill_fds() -> list[int]:
    """Open /dev/null until the fd table is full (EMFILE): the process is left with exactly its
    RLIMIT_NOFILE fds (fds are handed out lowest first, and all of ours are below the limit)."""
    fillers = []
    while True:
        try:
            fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            if exc.errno != errno.EMFILE:
                raise
            return fillers


def count_fds_at_limit(fillers: list[int]) -> int:
    """The fds open right now. Listing /proc/self/fd needs an fd of its own, and there is none left:
    lend it one filler's slot, count (that slot is then the listing's own fd), and take it back."""
    os.close(fillers.pop())
    n = len(os.listdir("/proc/self/fd"))      # L-1 of ours + the listing's = the L we had
    fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    return n


def serve(mode: str, fam: int, sockaddr: tuple, backlog: int, gap: float, nofile: int,
          lifetime: float, report_fd: int) -> dict:
    facts: dict = {"accepts_ns": [], "accept_calls": 0, "accept_errors": {},
                   "rlimit_nofile": None, "open_fds": None}
    kept: list[socket.socket] = []            # accepted sockets stay open: the server "holds" them
    fillers: list[int] = []
    deadline = time.monotonic() + lifetime
    try:
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGALRM, on_stop)
        signal.setitimer(signal.ITIMER_REAL, lifetime)   # also ends a blocking accept() in time
        srv = socket.socket(fam, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(sockaddr)
        srv.listen(backlog)
        if mode == "emfile":
            # The report pipe already exists (the parent made it before the fork): it is one of the
            # L fds, so reporting at the end needs no new fd.
            if max(srv.fileno(), report_fd) >= nofile:
                raise RuntimeError(f"--nofile {nofile} is below the server's own fds")
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            facts["rlimit_nofile"] = nofile
            fillers = fill_fds()
        os.write(report_fd, b"ready\n")        # listening (and, for emfile, starved): clients may come

        if mode == "idle":
            while time.monotonic() < deadline:     # never accept(): the queue fills and stays full
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        elif mode == "slow":
            while time.monotonic() < deadline:
                facts["accept_calls"] += 1
                conn, _ = srv.accept()            # blocking: returns as soon as the queue has one
                facts["accepts_ns"].append(now())
                kept.append(conn)
                time.sleep(gap)                   # the slow part: the queue refills meanwhile
        else:  # emfile
            while time.monotonic() < deadline:
                facts["accept_calls"] += 1
                try:
                    conn, _ = srv.accept()        # accept4() allocates the fd first: EMFILE at once
                except OSError as exc:
                    name = errno.errorcode.get(exc.errno, str(exc.errno))
                    facts["accept_errors"][name] = facts["accept_errors"].get(name, 0) + 1
                    if exc.errno == errno.EMFILE and facts["open_fds"] is None:
                        facts["open_fds"] = count_fds_at_limit(fillers)
                    time.sleep(0.01)              # what a server's retry loop does; bounds the spin
                    continue
                facts["accepts_ns"].append(now())   # only if an fd got freed somehow
                kept.append(conn)
    except Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.setitimer(signal.ITIMER_REAL, 0)
    for fd in fillers:
        os.close(fd)
    return facts


def run_server(mode: str, fam: int, sockaddr: tuple, args, lifetime: float, report_fd: int) -> None:
    """The child's whole life; it never returns into the parent's code."""
    status = 1
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(PR_SET_NAME, f"srv-{mode}".encode(), 0, 0, 0)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)   # no orphan if the parent dies hard
        close_strays({0, 1, 2, report_fd})
        try:
            facts = serve(mode, fam, sockaddr, args.backlog, args.accept_gap, args.nofile, lifetime, report_fd)
            line = json.dumps(facts)
            status = 0
        except Exception as exc:
            line = "error " + json.dumps(f"{type(exc).__name__}: {exc}")
        data = (line + "\n").encode()
        while data:
            data = data[os.write(report_fd, data):]
    finally:
        os._exit(status)


# -- the clients (parent) -------------------------------------------------------------------------------

def read_line(fd: int, buf: bytearray, seconds: float) -> str | None:
    """One line from the server's pipe, or None on EOF / after `seconds`."""
    deadline = time.monotonic() + seconds
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


def raise_nofile(n: int) -> None:
    """Room for every client socket in the parent (its own limit, not the server's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def connect_paced(fam: int, sockaddr: tuple, rate: float, seconds: float) -> tuple[list, list[int]]:
    """rate non-blocking connects per second for `seconds`, on a fixed schedule (no drift)."""
    n = int(round(rate * seconds))
    socks, times = [], []
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setblocking(False)
        times.append(now())
        s.connect_ex(sockaddr)          # EINPROGRESS: the handshake goes on without us
        socks.append(s)
    return socks, times


def is_connected(s: socket.socket) -> bool:
    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
        return False
    try:
        s.getpeername()                 # ENOTCONN while still in SYN-SENT
    except OSError:
        return False
    return True


def comm_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def scenario(mode: str, addr: str, port: int, args) -> dict:
    fam, sockaddr = resolve(addr, port)
    lifetime = args.seconds + args.hold + MARGIN
    raise_nofile(int(round(args.rate * args.seconds)))
    start = now()
    r, w = os.pipe()                    # made before the fork: the emfile server needs no new fd
    child = os.fork()
    if child == 0:
        os.close(r)
        run_server(mode, fam, sockaddr, args, lifetime, w)
    os.close(w)
    reaped = False
    socks: list[socket.socket] = []
    try:
        buf = bytearray()
        line = read_line(r, buf, STARTUP)
        if line != "ready":
            raise RuntimeError(f"server not ready: {line if line is not None else 'no answer'}")
        comm = comm_of(child)
        socks, connects = connect_paced(fam, sockaddr, args.rate, args.seconds)
        time.sleep(args.hold)           # everything stays as it is: the queue full, the clients waiting
        connected = sum(is_connected(s) for s in socks)
        for s in socks:
            s.close()
        socks = []
        os.kill(child, signal.SIGTERM)
        line = read_line(r, buf, MARGIN)
        os.waitpid(child, 0)
        reaped = True
        if line is None or line.startswith("error "):
            raise RuntimeError(f"server failed: {line if line is not None else 'no report'}")
        report = json.loads(line)
    finally:
        for s in socks:
            s.close()
        os.close(r)
        if not reaped:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(child, 0)
    return {"mode": mode, "server_pid": child, "server_comm": comm, "backlog": args.backlog, "port": port,
            "connects_ns": connects, "connected": connected, **report, "start_ns": start, "end_ns": now()}


def parse(argv: list[str]):
    p = argparse.ArgumentParser(description="Overflow a listener's accept queue three ways; one JSON line of facts.")
    p.add_argument("mode", choices=("idle", "slow", "emfile"))
    p.add_argument("addr")
    p.add_argument("port", type=int)
    p.add_argument("--backlog", type=int, default=8, help="listen() backlog (default 8)")
    p.add_argument("--rate", type=float, default=20.0, help="client connects per second (default 20)")
    p.add_argument("--seconds", type=float, default=4.0, help="how long the clients connect (default 4)")
    p.add_argument("--accept-gap", type=float, default=0.1, help="slow: seconds between accepts (default 0.1)")
    p.add_argument("--nofile", type=int, default=64, help="emfile: the server's RLIMIT_NOFILE (default 64)")
    p.add_argument("--hold", type=float, default=0.0, help="seconds to keep everything open afterwards (default 0)")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.seconds < 0 or args.hold < 0 or args.accept_gap < 0 or args.backlog < 0:
        p.error("--rate must be > 0; --seconds, --hold, --accept-gap, --backlog >= 0")
    return args


if __name__ == "__main__":
    a = parse(sys.argv[1:])
    try:
        facts = scenario(a.mode, a.addr, a.port, a)
    except RuntimeError as exc:           # the server could not start or report: say why, no traceback
        sys.exit(f"accept.py: {exc}")
    print(json.dumps(facts), flush=True)
