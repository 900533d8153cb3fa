#!/usr/bin/python3
"""The floor of the overhead benchmark: empty BPF programs on the hooks rsttrace attaches on a kernel
without kprobes (raw tracepoints sock:inet_sock_set_state, skb:consume_skb — or net:netif_receive_skb
where rsttrace would use it, or RSTTRACE_SYN_HOOK=netif_receive_skb says so —, skb:kfree_skb;
tracepoints tcp:tcp_send_reset, tcp:tcp_receive_reset). Each returns at once, so what the connection
storm loses with this attached is the kernel's own price of running a program on those hooks — what
any tracer of listen-queue drops pays there — and rsttrace's figure above it is its own work.
(bpftrace 0.17, Debian 12's, has no raw tracepoints; its tracepoints build a record first.)

    /usr/bin/python3 scripts/bench/floor.py [--hooks state,syn,kfree,rst]

--hooks keeps some of them (state: inet_sock_set_state; syn: the SYN hook; kfree: kfree_skb; rst:
the two reset tracepoints): what each hook costs on its own (`scripts/bench/overhead --by-hook`).

Compiled against rsttrace's own tiny header tree (bpf/kernel-headers: no kernel headers needed).
Prints "attached: empty programs" on stderr once attached; exits on SIGINT or SIGTERM.
"""
import os
import signal
import sys
from pathlib import Path

from bcc import BPF

PREAMBLE = "enum sk_rst_reason { SK_RST_REASON_NOT_SPECIFIED };   /* named by the 6.10+ tcp_send_reset format */\n"
HOOKS = {"state": "RAW_TRACEPOINT_PROBE(inet_sock_set_state) { return 0; }",
         "syn": "RAW_TRACEPOINT_PROBE(SYN_HOOK) { return 0; }",
         "kfree": "RAW_TRACEPOINT_PROBE(kfree_skb) { return 0; }",
         "rst": "TRACEPOINT_PROBE(tcp, tcp_send_reset) { return 0; }\n"
                "TRACEPOINT_PROBE(tcp, tcp_receive_reset) { return 0; }"}


def main() -> int:
    os.environ["BCC_KERNEL_SOURCE"] = str(Path(__file__).resolve().parents[2] / "bpf" / "kernel-headers")
    # The hook rsttrace reads SYN verdicts at (tracer/kernel/hooks.py): consume_skb where it has `location`.
    consume = Path("/sys/kernel/tracing/events/skb/consume_skb/format")
    with_location = consume.exists() and "location" in consume.read_text()
    syn_hook = "consume_skb" if with_location and os.environ.get("RSTTRACE_SYN_HOOK") != "netif_receive_skb" \
        else "netif_receive_skb"
    hooks = list(HOOKS)
    if len(sys.argv) == 3 and sys.argv[1] == "--hooks":
        hooks = sys.argv[2].split(",")
    elif len(sys.argv) != 1:
        sys.exit("usage: floor.py [--hooks " + ",".join(HOOKS) + "]")
    unknown = [h for h in hooks if h not in HOOKS]
    if unknown or not hooks:
        sys.exit(f"floor.py: unknown hooks {unknown}; choose from {', '.join(HOOKS)}")
    program = PREAMBLE + "\n".join(HOOKS[h] for h in hooks)
    bpf = BPF(text=program.replace("SYN_HOOK", syn_hook))
    print(f"attached: empty programs on {','.join(hooks)} (SYN hook {syn_hook})", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
