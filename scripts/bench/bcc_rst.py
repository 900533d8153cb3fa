#!/usr/bin/python3
"""The bcc peer of the benchmarks: a small bcc tool as people write them (tools/tcpstates.py,
tools/tcpdrop.py): the usual kernel includes, compiled against a FULL kernel header tree
(BCC_KERNEL_SOURCE), a perf buffer, one printed line per event. Same two tracepoints as rsttrace's
RST hooks, same in-kernel port filter. Runs under Debian's /usr/bin/python3 (python3-bpfcc).

    BCC_KERNEL_SOURCE=DIR /usr/bin/python3 scripts/bench/bcc_rst.py --port 8100[,8101] [--port ...]

Prints "Tracing TCP resets..." on stderr once attached; at SIGINT prints "Lost N events" on stdout
(the perf buffer's own count, as bpftrace does) and exits.
"""
import argparse
import ctypes
import signal
import socket
import sys

from bcc import BPF

PROGRAM = r"""
#include <uapi/linux/ptrace.h>
#include <net/sock.h>
#include <bcc/proto.h>

/* named by the 6.10+ tcp_send_reset format; the 6.1 headers do not have it (values: u32) */
enum sk_rst_reason { SK_RST_REASON_NOT_SPECIFIED };

struct data_t {
    u32 kind;          /* 0 sent, 1 received */
    s32 state;
    u32 reason;
    u16 family;
    u16 sport;
    u16 dport;
    u8 saddr[16];
    u8 daddr[16];
};
BPF_PERF_OUTPUT(events);
BPF_HASH(ports, u16, u8, 1024);

/* tcp_send_reset carries addresses as struct sockaddr_in / sockaddr_in6 */
static __always_inline void from_sockaddr(const u8 *sa, u16 *port, u8 *addr, u16 *family)
{
    u16 fam = sa[0] | (sa[1] << 8);
    *family = fam;
    *port = (sa[2] << 8) | sa[3];
    if (fam == AF_INET)
        __builtin_memcpy(addr, sa + 4, 4);
    else
        __builtin_memcpy(addr, sa + 8, 16);
}

TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
    struct data_t d = {};
    from_sockaddr(args->saddr, &d.sport, d.saddr, &d.family);
    from_sockaddr(args->daddr, &d.dport, d.daddr, &d.family);
    if (!ports.lookup(&d.sport) && !ports.lookup(&d.dport))
        return 0;
    d.kind = 0;
    d.state = args->state;
    d.reason = args->reason;
    events.perf_submit(args, &d, sizeof(d));
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    struct data_t d = {};
    d.sport = args->sport;
    d.dport = args->dport;
    if (!ports.lookup(&d.sport) && !ports.lookup(&d.dport))
        return 0;
    d.kind = 1;
    d.family = args->family;
    if (d.family == AF_INET) {
        __builtin_memcpy(d.saddr, args->saddr, 4);
        __builtin_memcpy(d.daddr, args->daddr, 4);
    } else {
        __builtin_memcpy(d.saddr, args->saddr_v6, 16);
        __builtin_memcpy(d.daddr, args->daddr_v6, 16);
    }
    events.perf_submit(args, &d, sizeof(d));
    return 0;
}
"""


def addr(family, raw):
    return socket.inet_ntop(socket.AF_INET, bytes(raw[:4])) if family == socket.AF_INET else \
        socket.inet_ntop(socket.AF_INET6, bytes(raw))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", action="append", required=True)
    args = parser.parse_args()
    ports = sorted({int(p) for group in args.port for p in group.split(",")})

    b = BPF(text=PROGRAM)
    for p in ports:
        b["ports"][ctypes.c_uint16(p)] = ctypes.c_uint8(1)
    lost = [0]
    stop = [False]

    def on_event(cpu, data, size):
        e = b["events"].event(data)
        if e.kind == 0:
            print(f"rst_sent {addr(e.family, e.saddr)}:{e.sport} > {addr(e.family, e.daddr)}:{e.dport} "
                  f"state {e.state} reason {e.reason}")
        else:
            print(f"rst_received {addr(e.family, e.saddr)}:{e.sport} < {addr(e.family, e.daddr)}:{e.dport}")

    def on_lost(n):
        lost[0] += n

    b["events"].open_perf_buffer(on_event, page_cnt=64, lost_cb=on_lost)   # bpftrace's default size
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__(0, True))
    print("Tracing TCP resets... Hit Ctrl-C to end.", file=sys.stderr, flush=True)
    while not stop[0]:
        b.perf_buffer_poll(timeout=100)
    b.perf_buffer_poll(timeout=0)
    print(f"Lost {lost[0]} events")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
