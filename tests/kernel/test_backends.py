"""Hook choice per kernel, and the kprobe backend's logic checked on this kernel as far as it can be:
its programs must pass this kernel's verifier, and its caller-based reason inference must agree with
the reasons this kernel states itself (tcp:tcp_send_reset `reason`, 6.10+). The kprobes themselves
run in the Debian 6.1 VM tier (tests/vm/)."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import REPO, RSTTRACE, events

from tracer.enrich import reasons
from tracer.kernel import loader
from tracer.kernel.capabilities import probe
from tracer.kernel.hooks import Hook, HookPlan, plan_hooks
from tracer.paths import BPF_DIR, KERNEL_HEADERS_DIR

PORT = 8100


def test_every_kprobe_program_passes_this_kernels_verifier(root):
    caps = probe()
    plan = HookPlan(rst_sent=Hook.KPROBE, syn_verdicts=Hook.KPROBE, ack_dropped=Hook.KPROBE, ipv6_reset=True,
                    files=["rst.bpf.c", "kprobe.bpf.c"])
    flags = loader.build_cflags(caps, loader.Filters(ports=[PORT]), caps.offsets, plan)
    os.environ["BCC_KERNEL_SOURCE"] = str(KERNEL_HEADERS_DIR)
    from bcc import BPF
    # Renamed so that bcc does not try to attach them (no kprobes here): load = verify only.
    src = loader.compose_source(plan.files).replace("int kprobe__", "int verify__")
    names = re.findall(r"int kprobe__(\w+)\(", (BPF_DIR / "kprobe.bpf.c").read_text())
    assert len(names) == 6
    b = BPF(text=src.encode(), cflags=flags)
    try:
        for name in names:
            assert b.load_func(f"verify__{name}".encode(), BPF.KPROBE).fd >= 0
    finally:
        b.cleanup()


def test_auto_plan_on_this_kernel_uses_tracepoints(root):
    cov = plan_hooks(probe()).coverage
    assert cov.hooks["rst_sent"] == "tracepoint:tcp:tcp_send_reset"
    assert cov.hooks["syn_dropped"] == "raw_tracepoint:skb:consume_skb"     # after the decision (6.3+)
    assert cov.hooks["ack_dropped"] == "raw_tracepoint:skb:kfree_skb"


@pytest.mark.parametrize("backend,word", [("kprobe", "kprobes"), ("fentry", "fentry")])
def test_forcing_function_hooks_this_kernel_lacks_is_a_one_line_error(root, backend, word):
    r = subprocess.run([*RSTTRACE, "--backend", backend, "--duration", "1"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 5
    assert r.stderr.strip().count("\n") == 0 and word in r.stderr


def test_caller_inference_agrees_with_the_kernels_own_reasons(netns, tracer):
    """What the kprobe backend would conclude from the same stacks and socket state, on every RST of
    the reproducers, equals what 6.18 says."""
    netns.sysctl("net.ipv4.tcp_abort_on_overflow", 1)
    t = tracer("--json", "--port", str(PORT))
    netns.scenario("closed_port", "127.0.0.1", PORT)
    netns.scenario("unread_close", "127.0.0.1", PORT)
    netns.scenario("unread_close", "::1", PORT)
    netns.scenario("linger_zero", "127.0.0.1", PORT)
    netns.run("/usr/bin/python3", str(REPO / "scripts" / "repro" / "burst.py"), "burst", "127.0.0.1", str(PORT), "2", "20")
    records = t.stop()
    sent = events(records, event="rst_sent", netns__inode=netns.inode)
    seen = set()
    for r in sent:
        flags = {"SYN": 0x02, "ACK": 0x10, "FIN": 0x01, "PSH": 0x08, "RST": 0x04, "URG": 0x20}
        tcp_flags = sum(flags[f] for f in r["evidence"]["tcp_flags"])
        q = r["queues"]
        inferred = reasons.infer_rst_reason(
            r["evidence"]["callers"], state=r["state"], unread=r["socket"]["unread_bytes"],
            linger_zero=r["socket"]["linger"], orphan=r["socket"]["orphan"], tcp_flags=tcp_flags,
            queue_full=bool(q and q["accept_qlen"] > q["accept_qmax"]),
            has_socket=r["socket"]["inode"] is not None or r["state"] is not None)
        assert inferred == r["reason"], (r["evidence"]["callers"], r["kernel_reason"])
        seen.add(r["reason"])
    assert {"no_listener", "closed_with_unread_data", "linger_zero", "listener_closed"} <= seen
