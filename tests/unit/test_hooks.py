"""The hook plan's choices: sock:inet_sock_set_state as a BTF tracepoint where the kernel lets one
attach (the probe's result in Capabilities.btf_tracepoints), else the raw tracepoint; how listeners
that predate rsttrace are learned; what the choices render to (every kernel: test_plan_golden.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tracer.kernel.capabilities import Capabilities
from tracer.kernel.hooks import STATE_HOOK_ENV, Hook, HookPlan, plan_hooks
from tracer.kernel.tracefs import TracepointFormat, parse_format

DATA = Path(__file__).resolve().parents[1] / "data"


def listen_capable(btf_tracepoints: dict[str, int]) -> Capabilities:
    """A 6.18-like kernel without kprobes: the reset tracepoints, the listen hooks' raw tracepoints."""
    caps = Capabilities(kernel="6.18.0", euid=0, effective_caps=0, btf=True, tracefs="/sys/kernel/tracing",
                        set_state=TracepointFormat("sock", "inet_sock_set_state"), netif_receive_skb=True,
                        offsets={"OFF_ICSK_SYN_QLEN": 1}, btf_tracepoints=btf_tracepoints)
    for name in ("tcp_send_reset", "tcp_receive_reset"):
        setattr(caps, name.replace("tcp_", "", 1), parse_format("tcp", name, (DATA / f"{name}-6.18.format").read_text()))
    caps.prog_load = {"raw_tracepoint": 0, "tracepoint": 0}
    return caps


def test_a_kernel_that_attaches_tp_btf_gets_the_btf_state_hook(monkeypatch):
    monkeypatch.delenv(STATE_HOOK_ENV, raising=False)
    plan = plan_hooks(listen_capable({"inet_sock_set_state": 38203}))
    assert "listen.bpf.c" in plan.files
    assert plan.state_hook_type == 38203 and "-DSTATE_HOOK_BTF" in plan.cflags()
    assert plan.btf_types == {"tp_btf__inet_sock_set_state": 38203}


@pytest.mark.parametrize("btf_tracepoints, env", [({}, None), ({"inet_sock_set_state": 38203}, "raw")])
def test_otherwise_the_raw_tracepoint(monkeypatch, btf_tracepoints, env):
    if env:
        monkeypatch.setenv(STATE_HOOK_ENV, env)
    else:
        monkeypatch.delenv(STATE_HOOK_ENV, raising=False)
    plan = plan_hooks(listen_capable(btf_tracepoints))
    assert "listen.bpf.c" in plan.files
    assert plan.state_hook_type is None and plan.btf_types == {}
    assert "-DSTATE_HOOK_BTF" not in plan.cflags()


def test_older_listeners_are_learned_from_sk_data_ready_and_poked_through_sock_recv_length(monkeypatch):
    monkeypatch.delenv(STATE_HOOK_ENV, raising=False)
    caps = listen_capable({})
    caps.data_ready = TracepointFormat("sock", "sk_data_ready")
    caps.recv_length = TracepointFormat("sock", "sock_recv_length")
    plan = plan_hooks(caps)
    assert plan.syn_verdicts is Hook.NETIF_RECEIVE_SKB and plan.learns_older_listeners and plan.pokes_listeners
    caps.recv_length = None
    plan = plan_hooks(caps)
    assert plan.learns_older_listeners and not plan.pokes_listeners
    assert "-DHAVE_SK_DATA_READY" in plan.cflags() and "-DHAVE_SOCK_RECV_LENGTH" not in plan.cflags()


def test_no_listener_is_learned_without_the_listen_hooks():
    caps = listen_capable({})
    caps.data_ready = TracepointFormat("sock", "sk_data_ready")
    caps.netif_receive_skb = False
    plan = plan_hooks(caps)
    assert plan.syn_verdicts is None and not plan.listen_hooks and not plan.learns_older_listeners
    assert plan.files == ["rst.bpf.c"]


def test_the_kprobe_plan_renders_every_function_hook():
    plan = HookPlan(rst_sent=Hook.KPROBE, syn_verdicts=Hook.FENTRY, ack_dropped=Hook.KPROBE, ipv6_reset=True)
    assert plan.cflags() == ["-DRST_SENT_BY_KPROBE", "-DKPROBE_RST", "-DFENTRY_SYN", "-DKPROBE_LISTEN_SYN",
                             "-DKPROBE_LISTEN_ACK", "-DHAVE_IPV6_RESET"]
    assert plan.function_hooks and not plan.listen_hooks
