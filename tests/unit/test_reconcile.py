"""Reconciliation rows (tracer/enrich/reconcile.py): where each baseline comes from, and no unknown
shown as 0."""
from __future__ import annotations

from tracer.enrich.listeners import CREATED_AFTER_START, LATE, START, NetnsState
from tracer.enrich.reconcile import PERCPU_COUNTERS, PercpuTotals, percpu_totals, reconcile


def state(inode=7, origin=START, baseline=None, latest=None, seen_before=None, gone=False) -> NetnsState:
    st = NetnsState(inode, "blue", "/run/netns/blue")
    st.origin, st.gone = origin, gone
    st.baseline = baseline if baseline is not None else {"TcpOutRsts": 10, "TcpExtListenDrops": 5}
    st.latest = latest if latest is not None else {"TcpOutRsts": 14, "TcpExtListenDrops": 8}
    st.seen_before = seen_before or {}
    return st


def test_a_netns_read_from_start_compares_the_hooks_counts_with_the_deltas():
    [row] = reconcile([state()], {7: {"rst_sent": 4, "syn_dropped": 3}}, {7: {"rst_sent": 4, "syn_dropped": 2}},
                      {}, {7: 1}, {})
    assert row["baseline"] == "start" and row["kernel"]["TcpOutRsts"] == 4 and row["kernel"]["TcpExtListenDrops"] == 3
    # Coverage counts every event the hooks saw (one syn_dropped was lost or aggregated, not missed).
    assert row["coverage_pct"] == {"rst_sent": 100.0, "listen_drops": 100.0, "syn_cookie": None}
    assert row["rsttrace"] == {"rst_sent": 4, "syn_dropped": 2}
    # A counter neither reading has is unknown, not 0.
    assert row["kernel"]["TcpExtSyncookiesSent"] is None


def test_the_per_cpu_reads_complete_a_netns_that_is_gone():
    st = state(gone=True, latest={"TcpOutRsts": 14, "TcpExtListenDrops": 6})
    totals = PercpuTotals(count={"TcpExtListenDrops": 9, "TcpExtListenOverflows": 4},
                          unexplained={"TcpExtListenDrops": 1, "TcpExtListenOverflows": 0})
    [row] = reconcile([st], {7: {"syn_dropped": 3}}, {}, {7: totals}, {7: 1}, {})
    assert row["gone"] is True
    assert row["kernel"]["TcpExtListenDrops"] == 4           # the later reading: 9 - 5
    assert row["kernel"]["TcpExtListenOverflows"] is None    # in no baseline: read by BPF only, from an unknown start
    assert row["unexplained"] == {"TcpExtListenDrops": 1}


def test_a_netns_made_after_start_and_never_entered_counts_from_zero():
    totals = PercpuTotals(count={"TcpExtSyncookiesSent": 47, "TcpExtListenDrops": 0})
    [row] = reconcile([], {9: {"syn_cookie": 47}}, {9: {"syn_cookie": 30}}, {9: totals}, {7: 1}, {})
    assert (row["baseline"], row["gone"], row["name"]) == (CREATED_AFTER_START, None, None)
    assert row["kernel"]["TcpExtSyncookiesSent"] == 47 and row["coverage_pct"]["syn_cookie"] == 100.0
    assert row["kernel"]["TcpOutRsts"] is None               # only the listen counters were read


def test_a_netns_that_existed_at_start_but_was_never_read_has_no_deltas():
    totals = PercpuTotals(count={"TcpExtListenDrops": 12})
    [row] = reconcile([], {}, {}, {9: totals}, {9: None}, {})
    assert row["baseline"] == "unknown" and all(v is None for v in row["kernel"].values())
    [row] = reconcile([], {}, {}, {9: totals}, {9: None}, {9: {"TcpExtListenDrops": 10}})
    assert row["baseline"] == "start" and row["kernel"]["TcpExtListenDrops"] == 2


def test_a_late_baseline_says_what_came_before_it():
    st = state(origin=LATE, seen_before={"rst_sent": 3})
    [row] = reconcile([st], {7: {"rst_sent": 7}}, {7: {"rst_sent": 7}}, {}, {7: 1}, {})
    assert row["events_before_baseline"] == 3 and row["rsttrace"] == {"rst_sent": 4}
    assert row["coverage_pct"]["rst_sent"] == 100.0          # the 4 written since, against the delta of 4


def test_per_cpu_reads_are_summed_per_netns():
    reads = [(7, [1, 2, 3, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]),
             (7, [0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]),
             (8, [5, 0, 0, 5, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0])]
    totals = percpu_totals(reads)
    assert totals[7].count == dict(zip(PERCPU_COUNTERS, [1, 3, 4, 0, 0]))
    assert totals[7].other_ports["TcpExtListenDrops"] == 1 and totals[7].unexplained["TcpExtListenDrops"] == 1
    assert totals[8].count["TcpExtSyncookiesSent"] == 5
