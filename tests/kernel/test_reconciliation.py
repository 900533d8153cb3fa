"""Reconciliation that never shows an unknown as 0: network namespaces made after rsttrace started,
flooded and deleted within seconds, reconcile with what their kernel counters really said."""
from __future__ import annotations

import time

import pytest

from conftest import BURST, Background, drop_syn_acks

PORT = 8100
LISTEN_COUNTERS = ("TcpExtSyncookiesSent", "TcpExtListenDrops", "TcpExtListenOverflows", "TcpExtTCPReqQFullDrop")


@pytest.mark.parametrize("lifetime", [3.0, 0.5])
def test_a_short_lived_netns_reconciles_with_the_kernels_real_numbers(make_netns, tracer, lifetime):
    # The case: syncookies=1, tcp_max_syn_backlog 16, 64 SYNs, in a netns made after rsttrace
    # started and gone before its summary (3 s: the sampler may have entered it once; 0.5 s: likely
    # never). Its counters started at 0, so what they said last is the whole story.
    t = tracer("--json", "--port", str(PORT))
    born = time.monotonic()
    ns = make_netns()
    ns.sysctl("net.ipv4.tcp_syncookies", 1)
    ns.sysctl("net.ipv4.tcp_max_syn_backlog", 16)
    drop_syn_acks(ns, PORT)
    server = Background(ns, "server", "127.0.0.1", str(PORT), "16", "20")
    ns.run("/usr/bin/python3", BURST, "synflood", "127.0.0.1", str(PORT), "64")
    server.stop()
    real = ns.counters()                     # the netns's own counters, read inside it at the end
    time.sleep(max(0.0, lifetime - (time.monotonic() - born)))
    inode = ns.inode
    ns.delete()
    records = t.stop()

    [row] = [n for n in records[-1]["reconciliation"] if n["inode"] == inode]
    why = f"{row} real {({k: real[k] for k in LISTEN_COUNTERS})}"
    assert row["baseline"] == "created_after_start", why
    assert real["TcpExtSyncookiesSent"] > 0, why
    for name in LISTEN_COUNTERS:                 # read per CPU by the BPF programs: exact
        assert row["kernel"][name] == real[name], why
    assert row["counted"].get("syn_cookie", 0) == real["TcpExtSyncookiesSent"], why
    assert row["coverage_pct"]["syn_cookie"] == 100.0, why
    # The other counters come from the sampler: its last reading if it entered the netns (then gone:
    # true), unknown if it never did (null: never 0 for what was not read).
    if row["gone"] is None:
        assert row["kernel"]["TcpOutRsts"] is None, why
    else:
        assert row["gone"] is True and row["kernel"]["TcpOutRsts"] == real["TcpOutRsts"], why
