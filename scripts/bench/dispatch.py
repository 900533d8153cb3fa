#!/usr/bin/python3
"""The kernel's price of one raw-tracepoint program run on this machine, for scripts/bench/bpf_time.

    /usr/bin/python3 scripts/bench/dispatch.py PRCTL_LOOP [PAIRS]      (prints one JSON line)

prctl(PR_SET_NAME) fires task:task_rename once per call and passes no hook of rsttrace's. One
empty raw-tracepoint program is loaded there once and attached and detached in turn, PAIRS times;
between the switches PRCTL_LOOP (prctl_loop.c, pinned to CPU 0) times the syscall. A pair's price
is its attached time less the mean of the detached times either side: the host's slow swings, which
move the syscall by more than the price, drop out of neighbours 0.1 s apart. That price is the
dispatch (the tracepoint's call through bpf_trace_runN into a program) every raw-tracepoint program
of rsttrace's pays at every run, on top of what run_time_ns counts.
"""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bcc import BPF


def main() -> int:
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: dispatch.py PRCTL_LOOP [PAIRS]")
    loop, pairs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 40
    os.environ["BCC_KERNEL_SOURCE"] = str(Path(__file__).resolve().parents[2] / "bpf" / "kernel-headers")
    bpf = BPF(text="RAW_TRACEPOINT_PROBE(task_rename) { return 0; }")     # attached on load

    def per_call() -> float:
        out = subprocess.run([loop, "0", "50000", "3"], capture_output=True, text=True, check=True)
        return float(out.stdout)

    try:
        bpf.detach_raw_tracepoint(tp=b"task_rename")
        bare, prices = [per_call()], []
        for _ in range(pairs):
            bpf.attach_raw_tracepoint(tp=b"task_rename", fn_name=b"raw_tracepoint__task_rename")
            try:
                traced = per_call()
            finally:
                bpf.detach_raw_tracepoint(tp=b"task_rename")
            bare.append(per_call())
            prices.append(traced - (bare[-2] + bare[-1]) / 2)
    finally:
        bpf.cleanup()
    print(json.dumps({"prices_ns": prices, "syscall_ns": bare, "median_ns": statistics.median(prices)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
