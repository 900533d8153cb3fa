#!/usr/bin/python3
"""Empty BPF programs on the hooks rsttrace attaches by default on a kernel without kprobes: raw
tracepoints sock:inet_sock_set_state, skb:consume_skb (net:netif_receive_skb where rsttrace would use
it, or RSTTRACE_SYN_HOOK=netif_receive_skb says so) and skb:kfree_skb; tracepoints tcp:tcp_send_reset,
tcp:tcp_receive_reset, and connections' stories' tcp:tcp_retransmit_skb and tcp_retransmit_synack;
and the raw tracepoint icmp:icmp_send (Linux 6.12+), where rsttrace's origins (bpf/origin.bpf.c) see
a REJECT's ICMP answer by default (their other default work, RSTs that find no connection, is a
branch in the kfree_skb program: no hook of its own). Each returns at once: what they cost a
connection (or a packet) is the kernel's own price of running a program on those hooks, the floor
any tracer of listen-queue drops pays there, and rsttrace's cost above it is its own work
(scripts/bench/overhead and scripts/bench/bulk, by the kernel's accounting).

    /usr/bin/python3 scripts/bench/empty_programs.py [--origins]

--origins: also the per-packet hooks `rsttrace --origins` adds (tracer/kernel/hooks.py,
_plan_origins): raw tracepoints net:net_dev_queue (every packet leaving a device) and
net:netif_receive_skb (every packet entering; one program where it is the SYN hook already, as in
rsttrace), where both exist: the floor of `rsttrace --origins`, so that the difference between the
two floors is what those hooks cost as empty programs.

Compiled against rsttrace's own tiny header tree (bpf/kernel-headers: no kernel headers needed).
Prints "attached: empty programs (...)" on stderr once attached, with the hooks it chose; exits on
SIGINT or SIGTERM.
"""
import argparse
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
TRACEFS = Path("/sys/kernel/tracing/events")


def origin_hooks(syn_hook: str, per_packet: bool) -> list[str]:
    """The raw tracepoints rsttrace's origins attach besides the hooks above (tracer/kernel/hooks.py,
    _plan_origins): icmp_send where it exists (by default); with per_packet (--origins) net_dev_queue
    and netif_receive_skb where both exist (netif_receive_skb only where it is not the SYN hook already)."""
    hooks = []
    if per_packet and (TRACEFS / "net" / "net_dev_queue").is_dir() and (TRACEFS / "net" / "netif_receive_skb").is_dir():
        hooks.append("net_dev_queue")
        if syn_hook != "netif_receive_skb":
            hooks.append("netif_receive_skb")
    if (TRACEFS / "icmp" / "icmp_send").is_dir():
        hooks.append("icmp_send")
    return hooks


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--origins", action="store_true",
                    help="also the per-packet hooks of rsttrace --origins, net_dev_queue and netif_receive_skb "
                         "(its floor)")
    args = ap.parse_args()
    os.environ["BCC_KERNEL_SOURCE"] = str(Path(__file__).resolve().parents[2] / "bpf" / "kernel-headers")
    # The hook rsttrace reads SYN verdicts at (tracer/kernel/hooks.py): consume_skb where it has `location`.
    consume = TRACEFS / "skb" / "consume_skb" / "format"
    with_location = consume.exists() and "location" in consume.read_text()
    syn_hook = "consume_skb" if with_location and os.environ.get("RSTTRACE_SYN_HOOK") != "netif_receive_skb" \
        else "netif_receive_skb"
    origins = origin_hooks(syn_hook, args.origins)
    text = PROGRAM.replace("SYN_HOOK", syn_hook) + "".join(
        f"RAW_TRACEPOINT_PROBE({hook}) {{ return 0; }}\n" for hook in origins)
    bpf = BPF(text=text)
    print(f"attached: empty programs (SYN hook {syn_hook}; origins' own hooks: "
          f"{', '.join(origins) if origins else 'none'})", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
