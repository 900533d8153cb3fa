"""Why an accept queue is full: the server does not accept, its accept() fails (EMFILE), or it accepts
slower than connections arrive — told apart from the server's own system calls (bpf/app.bpf.c).

scripts/repro/accept.py runs each server in a private netns (comm srv-idle, srv-emfile, srv-slow) and
paced clients, and reports what it did: every connect(), every accept() and how many failed. rsttrace
must say which of the three it is in the explanation of the accept-queue drops, with the numbers:
the fd limit for EMFILE, the accept and SYN rates for the slow one — checked against the facts.
"""
from __future__ import annotations

import json

import pytest

from conftest import REPO, STATE_HOOKS, events, state_hook_env

ACCEPT = str(REPO / "scripts" / "repro" / "accept.py")
PORT = 8310                     # not a port other suites running beside this one use


def run_accept(ns, mode: str, *extra: str) -> dict:
    out = ns.run("/usr/bin/python3", ACCEPT, mode, "127.0.0.1", str(PORT), *extra, timeout=90)
    return json.loads(out.stdout.strip().splitlines()[-1])


def queue_full_drops(records, ns) -> list[dict]:
    return [r for r in events(records, netns__inode=ns.inode)
            if r["event"] in ("syn_dropped", "ack_dropped") and r["reason"] == "accept_queue_full"]


def listener_rows(records, ns) -> list[dict]:
    """The `listeners` rows of PORT in that netns, in the order they were written."""
    return [row for r in records if r["type"] == "listeners" for row in r["listeners"]
            if row["netns"]["inode"] == ns.inode and row["local"]["port"] == PORT]


def rate(times_ns: list[int]) -> float:
    return (len(times_ns) - 1) / ((times_ns[-1] - times_ns[0]) / 1e9)


def test_a_server_that_never_accepts_is_reported_as_not_accepting(netns, tracer):
    t = tracer("--json", "--port", str(PORT), "--netns", netns.name, "--app-errors")
    facts = run_accept(netns, "idle", "--backlog", "4", "--rate", "20", "--seconds", "2")
    records = t.stop()

    assert facts["accept_calls"] == 0 and facts["server_comm"] == "srv-idle"
    drops = queue_full_drops(records, netns)
    assert drops
    for d in drops:
        accept = d["accept"]
        assert accept["cause"] == "not_accepting", d
        assert (accept["calls"], accept["accepted"], accept["last_call_s_ago"]) == (0, 0, None)
        assert accept["syns"] >= 1
        assert "no accept() call on it since rsttrace started" in d["explanation"]


@pytest.mark.parametrize("state_hook", STATE_HOOKS)
def test_accept_failing_with_emfile_is_told_with_the_fd_limit(netns, tracer, state_hook):
    # raw_syscalls:sys_exit as a BTF tracepoint (this kernel), and as a raw one (kernels without tp_btf)
    t = tracer("--json", "--port", str(PORT), "--netns", netns.name, "--app-errors", env=state_hook_env(state_hook))
    facts = run_accept(netns, "emfile", "--backlog", "4", "--rate", "20", "--seconds", "2", "--nofile", "64",
                       "--hold", "1")
    records = t.stop()

    kind = {"tp_btf": "tp_btf", "raw": "raw_tracepoint"}[state_hook]
    assert records[0]["hooks"]["app_errors"]["hook"].startswith(f"{kind}:raw_syscalls:sys_exit")
    assert facts["accept_errors"]["EMFILE"] > 0 and not facts["accepts_ns"]
    assert (facts["rlimit_nofile"], facts["open_fds"]) == (64, 64)
    drops = queue_full_drops(records, netns)
    assert drops
    for d in drops:
        accept = d["accept"]
        assert accept["cause"] == "accept_failing", d
        assert accept["last_error"] == "EMFILE" and accept["accepted"] == 0
        assert 0 < accept["errors"]["EMFILE"] <= facts["accept_errors"]["EMFILE"]
        assert accept["failed"] == accept["errors"]["EMFILE"] <= accept["calls"]
        assert (accept["rlimit_nofile"], accept["open_fds"]) == (64, 64)
        assert accept["last_caller"] == {"pid": facts["server_pid"], "comm": "srv-emfile"}
        assert "with EMFILE (RLIMIT_NOFILE 64, 64 fds open)" in d["explanation"]
        assert f"srv-emfile (pid {facts['server_pid']})" in d["explanation"]


def test_a_slow_acceptor_is_told_with_both_rates(netns, tracer):
    t = tracer("--json", "--port", str(PORT), "--netns", netns.name, "--app-errors")
    facts = run_accept(netns, "slow", "--backlog", "4", "--rate", "40", "--seconds", "3", "--accept-gap", "0.1")
    records = t.stop()

    accepts = facts["accepts_ns"]
    drops = queue_full_drops(records, netns)
    assert drops and len(accepts) >= 10
    for d in drops:
        accept = d["accept"]
        assert accept["cause"] == "accepting_slowly", d
        assert accept["last_caller"] == {"pid": facts["server_pid"], "comm": "srv-slow"}
        assert accept["accepted"] <= len(accepts) and accept["failed"] == 0
    # The accept rate the server kept (the block is read a moment after its event: the accepts up to
    # then, at the server's steady pace).
    last = drops[-1]
    assert last["accept"]["accepted"] >= 10
    assert abs(last["accept"]["accepts_per_s"] - rate(accepts)) <= 0.1 * rate(accepts)
    assert f"srv-slow (pid {facts['server_pid']}) accepts {last['accept']['accepts_per_s']:g}/s" in last["explanation"]
    assert last["accept"]["syns_per_s"] > last["accept"]["accepts_per_s"]


def test_accept_and_arrival_rates_match_what_the_processes_measured(netns, tracer):
    # A backlog the whole run fits in: no drop, no SYN retransmit — every SYN is one connect().
    t = tracer("--json", "--port", str(PORT), "--netns", netns.name, "--app-errors")
    facts = run_accept(netns, "slow", "--backlog", "128", "--rate", "30", "--seconds", "3", "--accept-gap", "0.1",
                       "--hold", "3")
    records = t.stop()

    assert not queue_full_drops(records, netns)
    connects, accepts = facts["connects_ns"], facts["accepts_ns"]
    rows = [row for row in listener_rows(records, netns) if row["accept"]["syns"] == len(connects)]
    assert rows, listener_rows(records, netns)      # a `listeners` record after the last client came
    accept = rows[-1]["accept"]
    assert accept["syns"] == len(connects)          # every SYN that reached it, exactly
    assert abs(accept["syns_per_s"] - rate(connects)) <= 0.1 * rate(connects)
    assert 2 <= accept["accepted"] <= len(accepts) and accept["calls"] >= accept["accepted"]
    assert abs(accept["accepts_per_s"] - rate(accepts[:accept["accepted"]])) <= 0.1 * rate(accepts)
    assert accept["last_caller"]["pid"] == facts["server_pid"]
