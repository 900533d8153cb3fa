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


def test_drops_at_an_untraced_port_of_a_watched_netns_are_counted_as_the_other_ports(netns, tracer):
    # A listener on the traced port sits idle; another, on a port rsttrace does not trace, overflows.
    # Its SYNs are only counted on their way (reading the counters there would tax every connection of
    # the host); at exit, with the hooks detached, each CPU's counters are read once more, and what
    # moved is put down to the other ports: every drop the kernel counted is accounted for.
    t = tracer("--json", "--port", str(PORT))
    idle = Background(netns, "server", "127.0.0.1", str(PORT), "5", "30")
    busy = Background(netns, "server", "127.0.0.1", str(PORT + 100), "2", "30")
    before = netns.counters()
    netns.run("/usr/bin/python3", BURST, "clients", "127.0.0.1", str(PORT + 100), "30", "1.5")
    after = netns.counters()
    records = t.stop()
    idle.stop()
    busy.stop()

    [row] = [n for n in records[-1]["reconciliation"] if n["inode"] == netns.inode]
    assert row["gone"] is False, row           # read once more at exit, alive
    overflows = after["TcpExtListenOverflows"] - before["TcpExtListenOverflows"]
    assert overflows > 0 and row["counted"].get("syn_dropped", 0) == 0, row
    assert row["other_ports"].get("TcpExtListenOverflows", 0) + row.get("unexplained", {}).get(
        "TcpExtListenOverflows", 0) == overflows == row["kernel"]["TcpExtListenOverflows"], row
