#!/usr/bin/python3
"""Empty BPF programs on the hooks rsttrace attaches on a kernel without kprobes: raw tracepoints
sock:inet_sock_set_state, skb:consume_skb (net:netif_receive_skb where rsttrace would use it, or
RSTTRACE_SYN_HOOK=netif_receive_skb says so) and skb:kfree_skb; tracepoints tcp:tcp_send_reset,
tcp:tcp_receive_reset, and connections' stories' tcp:tcp_retransmit_skb and tcp_retransmit_synack.
Each returns at once: what they cost a connection is the kernel's own price of running a program on
those hooks, the floor any tracer of listen-queue drops pays there, and rsttrace's cost above it is
its own work (scripts/bench/overhead, by the kernel's accounting).

    /usr/bin/python3 scripts/bench/empty_programs.py

Compiled against rsttrace's own tiny header tree (bpf/kernel-headers: no kernel headers needed).
Prints "attached: empty programs" on stderr once attached; exits on SIGINT or SIGTERM.
"""
import os
import signal
import sys
from pathlib import Path

from bcc import BPF

PROGRAM = """
enum sk_rst_reason { SK_RST_REASON_NOT_SPECIFIED };   /* named by the 6.10+ tcp_send_reset format */
RAW_TRACEPOINT_PROBE(inet_sock_set_state) { return 0; }
RAW_TRACEPOINT_PROBE(SYN_HOOK) { return 0; }
RAW_TRACEPOINT_PROBE(kfree_skb) { return 0; }
TRACEPOINT_PROBE(tcp, tcp_send_reset) { return 0; }
TRACEPOINT_PROBE(tcp, tcp_receive_reset) { return 0; }
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) { return 0; }
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack) { return 0; }
"""


def main() -> int:
    os.environ["BCC_KERNEL_SOURCE"] = str(Path(__file__).resolve().parents[2] / "bpf" / "kernel-headers")
    # The hook rsttrace reads SYN verdicts at (tracer/kernel/hooks.py): consume_skb where it has `location`.
    consume = Path("/sys/kernel/tracing/events/skb/consume_skb/format")
    with_location = consume.exists() and "location" in consume.read_text()
    syn_hook = "consume_skb" if with_location and os.environ.get("RSTTRACE_SYN_HOOK") != "netif_receive_skb" \
        else "netif_receive_skb"
    bpf = BPF(text=PROGRAM.replace("SYN_HOOK", syn_hook))
    print(f"attached: empty programs (SYN hook {syn_hook})", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
