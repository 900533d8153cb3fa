#!/usr/bin/python3
"""The conn storm's rate with programs attached and detached every SLOT seconds, for
scripts/bench/alternate (it reads the slots).

    /usr/bin/python3 scripts/bench/alternate.py STORM SECONDS SLOT [--by-hook]     (prints one JSON line)

One storm (STORM: rststorm, `conn` on benchlib.STORM_PORT in a private netns) runs throughout. The
programs of each condition are loaded once, then attached for one slot at a time, between two
no-program slots: [none, X] over and over, X in turn each of
  empty     empty programs on rsttrace's per-connection hooks (floor.py's, less the two reset
            tracepoints, which this storm never fires);
  rsttrace  rsttrace's own programs and maps as `rsttrace --port OTHER_PORT` loads them
            (tracer.kernel.loader.RstProgram), on the same hooks — its BTF tracepoint where it has one;
  sham      empty programs on three tracepoints the storm never fires: attaching and detaching
            costs what it costs the others, the programs never run (≈ 0: the method's own bias);
  --by-hook, also: empty_state, the empty program on inet_sock_set_state alone (10 runs per
            connection), and empty_others, those on the SYN hook and kfree_skb alone.
Attaching and detaching take a link's open and close (~0.3 ms), outside every slot. Each slot's
connections come from the netns's ActiveOpens (/proc/PID/net/snmp of the storm).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts" / "bench"))

from bcc import BPF                                   # noqa: E402

import floor                                          # noqa: E402
from benchlib import OTHER_PORT, LongStorm, Netns     # noqa: E402
from tracer.kernel import bpfsys, progcache           # noqa: E402
from tracer.kernel.capabilities import probe          # noqa: E402
from tracer.kernel.hooks import plan_hooks            # noqa: E402
from tracer.kernel.loader import Filters, RstProgram  # noqa: E402

PER_CONNECTION = {"inet_sock_set_state", "consume_skb", "netif_receive_skb", "kfree_skb"}
SHAM = ("task_rename", "task_prctl_unknown", "sched_process_hang")


class Switch:
    """Loaded programs, attached (on) and detached (off) as one: their links are opened and closed."""

    def __init__(self, funcs: dict, hooks: set[str]):
        self.programs: list[tuple[str, str, int]] = []       # (name, raw tracepoint, program fd)
        for name, fn in funcs.items():
            name = name.decode() if isinstance(name, bytes) else name
            target = progcache.attach_target(name)
            if target and target[1] in hooks:
                self.programs.append((name, target[1], fn.fd))
        self.links: list[int] = []

    def on(self) -> None:
        for name, tracepoint, fd in self.programs:     # a BTF tracepoint program knows its tracepoint
            self.links.append(bpfsys.raw_tracepoint_open(None if name.startswith("tp_btf__") else tracepoint, fd))

    def off(self) -> None:
        while self.links:
            os.close(self.links.pop())


def detached_bcc(text: str) -> BPF:
    """Programs bcc compiles and loads (and attaches: undone at once)."""
    bpf = BPF(text=text)
    for tp in list(bpf.raw_tracepoint_fds):
        bpf.detach_raw_tracepoint(tp)
    for tp in list(bpf.tracepoint_fds):
        bpf.detach_tracepoint(tp)
    return bpf


def main() -> int:
    if len(sys.argv) not in (4, 5) or sys.argv[4:] not in ([], ["--by-hook"]):
        sys.exit("usage: alternate.py STORM SECONDS SLOT [--by-hook]")
    storm_exe, seconds, slot = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    by_hook = sys.argv[4:] == ["--by-hook"]
    caps = probe()
    plan = plan_hooks(caps)
    real = RstProgram(caps, Filters(ports=[OTHER_PORT]), plan)
    os.environ["BCC_KERNEL_SOURCE"] = str(REPO / "bpf" / "kernel-headers")
    syn_hook = "consume_skb" if "-DLISTEN_SYN_CONSUMED" in plan.macros else "netif_receive_skb"
    empty = sham = None
    try:
        real.detach()
        empty = detached_bcc(floor.PREAMBLE + "\n".join(floor.HOOKS[h] for h in ("state", "syn", "kfree"))
                             .replace("SYN_HOOK", syn_hook))
        sham = detached_bcc("\n".join(f"RAW_TRACEPOINT_PROBE({tp}) {{ return 0; }}" for tp in SHAM))
        switches = {"empty": Switch(empty.funcs, PER_CONNECTION), "rsttrace": Switch(real.bpf.funcs, PER_CONNECTION),
                    "sham": Switch(sham.funcs, set(SHAM))}
        if by_hook:
            switches["empty_state"] = Switch(empty.funcs, {"inet_sock_set_state"})
            switches["empty_others"] = Switch(empty.funcs, PER_CONNECTION - {"inet_sock_set_state"})
        hooks = {c: sorted(p[0] for p in s.programs) for c, s in switches.items()}
        order = list(switches)
        sequence: list[str] = []
        for i in range(max(1, int(seconds / slot / 2))):
            sequence += ["none", order[i % len(order)]]
        sequence.append("none")
        slots = []
        with Netns() as ns:
            storm = LongStorm(ns, storm_exe, "conn", len(sequence) * slot * 2 + 60)
            try:
                time.sleep(2.0)           # TIME_WAIT filling up: not measured
                for name in sequence:
                    switch = switches.get(name)
                    if switch:
                        switch.on()
                    try:
                        t0, n0, _ = storm.sample(cpu=False)
                        time.sleep(slot)
                        t1, n1, _ = storm.sample(cpu=False)
                    finally:
                        if switch:
                            switch.off()
                    slots.append([name, round(t1 - t0, 6), n1 - n0])
            finally:
                storm.stop()
    finally:
        for s in (empty, sham):
            if s is not None:
                s.cleanup()
        real.close()
    print(json.dumps({"slot_s": slot, "syn_hook": syn_hook, "hooks": hooks, "slots": slots}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
