"""Which hook the plan picks for sock:inet_sock_set_state: a BTF tracepoint where the kernel lets one
attach (the probe's result in Capabilities.btf_tracepoints), else the raw tracepoint."""
from __future__ import annotations

from pathlib import Path

import pytest

from tracer.kernel.capabilities import Capabilities
from tracer.kernel.hooks import STATE_HOOK_ENV, plan_hooks
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
    assert "-DSTATE_HOOK_BTF" in plan.macros
    assert plan.btf_types == {"tp_btf__inet_sock_set_state": 38203}


@pytest.mark.parametrize("btf_tracepoints, env", [({}, None), ({"inet_sock_set_state": 38203}, "raw")])
def test_otherwise_the_raw_tracepoint(monkeypatch, btf_tracepoints, env):
    if env:
        monkeypatch.setenv(STATE_HOOK_ENV, env)
    else:
        monkeypatch.delenv(STATE_HOOK_ENV, raising=False)
    plan = plan_hooks(listen_capable(btf_tracepoints))
    assert "listen.bpf.c" in plan.files
    assert "-DSTATE_HOOK_BTF" not in plan.macros and plan.btf_types == {}
