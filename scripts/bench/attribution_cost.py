"""What naming a socket's owner costs: the /proc fd index rsttrace uses, against tracking owners in BPF.

Run as root from the repository root (bounded: some seconds; traffic only on loopback):

    .venv/bin/python scripts/bench/attribution_cost.py [--procs 1,100,400] [--socks 100] [--io 200000]

1. /proc fd index rebuild (tracer.enrich.attribution.SocketOwners): the host as it is, then with extra
   processes holding `--socks` sockets each.
2. Per-event lookups done in user space: process info, cgroup (/proc/PID/cgroup), the listener on a
   port (inet_diag from inside the netns; the head of /proc/net/tcp{,6} for comparison).
3. The alternative: a BPF map sk → owner filled in process context from sock:sock_send_length /
   sock:sock_recv_length (Linux 6.3+) — the cost every send()/recv() on the host would pay, measured
   on a loopback TCP ping-pong with and without the program attached.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tracer.enrich.attribution import PortListeners, SocketOwners, process_info  # noqa: E402
from tracer.enrich.cgroups import Cgroups  # noqa: E402

HOLDER = """
import socket, sys, time
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
print("ready", flush=True)
sys.stdin.readline()
"""

# Owner tracking in BPF, prototype: first process-context sighting of a socket wins (LRU-bounded).
OWNER_BPF = r"""
struct owner { __u32 tgid; __u32 uid; __u64 cgroup; char comm[16]; };
BPF_TABLE("lru_hash", __u64, struct owner, owners, 65536);
static __always_inline void seen(__u64 sk)
{
    if (owners.lookup(&sk))
        return;
    struct owner o = {};
    o.tgid = bpf_get_current_pid_tgid() >> 32;
    o.uid = (__u32)bpf_get_current_uid_gid();
    o.cgroup = bpf_get_current_cgroup_id();
    bpf_get_current_comm(o.comm, sizeof(o.comm));
    owners.update(&sk, &o);
}
TRACEPOINT_PROBE(sock, sock_send_length) { seen((__u64)args->sk); return 0; }
TRACEPOINT_PROBE(sock, sock_recv_length) { seen((__u64)args->sk); return 0; }
"""


def timed(fn, repeat: int = 5) -> dict:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(runs), 3), "min_ms": round(min(runs), 3)}


def fd_count() -> int:
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                n += len(os.listdir(f"/proc/{entry}/fd"))
            except OSError:
                pass
    return n


def bench_rebuild(procs_list: list[int], socks: int) -> list[dict]:
    out = []
    for nprocs in procs_list:
        holders = []
        try:
            for _ in range(nprocs if nprocs > 1 else 0):
                p = subprocess.Popen([sys.executable, "-c", HOLDER, str(socks)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
                holders.append(p)
            for p in holders:
                p.stdout.readline()
            owners = SocketOwners()
            t = timed(owners._rebuild)
            out.append({"extra_procs": len(holders), "sockets_each": socks if holders else 0,
                        "processes": sum(1 for e in os.listdir("/proc") if e.isdigit()), "fds": fd_count(),
                        "sockets_indexed": len(owners._index), **t})
        finally:
            for p in holders:
                p.stdin.close()
            for p in holders:
                p.wait(timeout=10)
    return out


def read_proc_net_tcp() -> None:
    for name in ("tcp", "tcp6"):
        with open(f"/proc/self/net/{name}") as f:
            f.read(65536)


def bench_per_event() -> dict:
    pid = os.getpid()
    cg = Cgroups()
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    netns = int(os.readlink("/proc/self/ns/net")[5:-1])

    def cold_listener():
        PortListeners().inodes(netns, "127.0.0.1", port, pid)

    def cold_cgroup():
        Cgroups()._read(pid)
    res = {
        "process_info_status_read_ms": timed(lambda: [process_info(pid) for _ in range(100)])["median_ms"] / 100,
        "cgroup_read_ms": timed(lambda: [cold_cgroup() for _ in range(100)])["median_ms"] / 100,
        "cgroup_cached_ms": timed(lambda: [cg.of(pid) for _ in range(1000)])["median_ms"] / 1000,
        "port_listener_lookup_ms": timed(lambda: [cold_listener() for _ in range(100)])["median_ms"] / 100,
        # the alternative to inet_diag: the head of /proc/net/tcp{,6} (the kernel walks every hash bucket)
        "proc_net_tcp_head_read_ms": timed(lambda: [read_proc_net_tcp() for _ in range(20)])["median_ms"] / 20,
    }
    srv.close()
    return {k: round(v, 4) for k, v in res.items()}


PINGPONG_C = r"""
#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv)
{
    long n = atol(argv[1]), i;
    int one = 1, srv = socket(AF_INET, SOCK_STREAM, 0), a = socket(AF_INET, SOCK_STREAM, 0), b;
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof(sa);
    char c = 'x';
    struct timespec t0, t1;
    bind(srv, (void *)&sa, sizeof(sa)); listen(srv, 1); getsockname(srv, (void *)&sa, &len);
    if (connect(a, (void *)&sa, sizeof(sa)) || (b = accept(srv, 0, 0)) < 0) return 1;
    setsockopt(a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (i = 0; i < n; i++) {
        send(a, &c, 1, 0); recv(b, &c, 1, 0);
        send(b, &c, 1, 0); recv(a, &c, 1, 0);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%.1f\n", ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / (2.0 * n));
    return 0;
}
"""


def pingpong_binary(tmp: str) -> str:
    src, exe = os.path.join(tmp, "pingpong.c"), os.path.join(tmp, "pingpong")
    with open(src, "w") as f:
        f.write(PINGPONG_C)
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return exe


def pingpong(exe: str, n: int) -> float:
    """ns per send()+recv() of one byte over loopback TCP (a C ping-pong: 4 syscalls per round trip)."""
    return float(subprocess.run([exe, str(n)], capture_output=True, text=True, check=True).stdout)


def bench_bpf_tracking(io: int) -> dict:
    os.environ["BCC_KERNEL_SOURCE"] = str(REPO / "bpf" / "kernel-headers")
    from bcc import BPF
    with tempfile.TemporaryDirectory() as tmp:
        exe = pingpong_binary(tmp)
        base = [pingpong(exe, io) for _ in range(5)]
        b = BPF(text=OWNER_BPF)
        try:
            traced = [pingpong(exe, io) for _ in range(5)]
            entries = len(b["owners"].items())
        finally:
            b.cleanup()
        after = [pingpong(exe, io) for _ in range(5)]
    plain = statistics.median(base + after)
    with_bpf = statistics.median(traced)
    return {"send_recv_pair_ns_plain": round(plain), "send_recv_pair_ns_with_owner_tracking": round(with_bpf),
            "added_ns_per_send_recv_pair": round(with_bpf - plain), "map_entries": entries, "pairs_per_run": io}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", default="1,100,400")
    ap.add_argument("--socks", type=int, default=100)
    ap.add_argument("--io", type=int, default=200000)
    args = ap.parse_args()
    print(json.dumps({
        "proc_fd_index_rebuild": bench_rebuild([int(x) for x in args.procs.split(",")], args.socks),
        "per_event_user_space": bench_per_event(),
        "bpf_owner_tracking": bench_bpf_tracking(args.io),
    }, indent=1))


if __name__ == "__main__":
    main()
