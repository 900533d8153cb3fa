"""A fleet on one machine: three network namespaces stand in for three hosts, each with its own
rsttrace (--netns NAME) exporting everything at once (--json, --metrics, --otlp, --syslog), and one
set of real consumers for the three — a Prometheus scraping the three /metrics, an OTLP/HTTP
receiver, Debian's rsyslogd. Each host makes its own mix of resets, with counts no other host has,
so that a host's numbers landing under another's fail the test.

Every consumer must hold, per host and reason, what was generated in that host and what its kernel
counted there (TcpOutRsts, ListenOverflows read inside the netns). The hosts are told apart by what
the exports carry: Prometheus by the scrape target (instance) and the netns label; syslog messages
by PROCID (the rsttrace's pid) and the netns SD param; OTLP records only by what they are about —
an event's rsttrace.netns.*, a summary's reconciliation row — since the three resources are the
same (one machine, one host.name, and no attribute of the rsttrace process).
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import BURST, Background, Tracer
from receivers import OtlpReceiver, attrs, free_port, wait_for
from tracer.sinks.syslog import SENT_TYPES

PORT = random.randrange(20000, 30000)       # the service port of every host: each netns has its own ports
BACKLOG = 2                                  # host C's listener: an accept queue of BACKLOG + 1
CLIENTS = 12                                 # host C's burst of connects at it
HOLD_S = 0.3                                 # how long the burst's clients wait: under the first SYN retransmit

# What each host does, and the resets (event, reason) that makes, per kind of traffic. Host C's
# listen-queue drops and never-established connections come from its burst: their counts are what
# the kernel and the clients report, not fixed here.
MIXES = {
    "a": {"closed_port": 5},
    "b": {"unread_close": 2, "linger_zero": 1, "closed_port": 1},
    "c": {"overflow": 1, "closed_port": 2},
}
RESETS = {
    "closed_port": {("rst_sent", "no_listener"): 1, ("rst_received", "peer_reset"): 1},
    "unread_close": {("rst_sent", "closed_with_unread_data"): 1, ("rst_received", "peer_reset"): 1},
    "linger_zero": {("rst_sent", "linger_zero"): 1, ("rst_received", "peer_reset"): 1},
    # The listener closes with BACKLOG + 1 connections queued; their clients have closed already, so
    # no client socket takes those RSTs as a reset of its own.
    "overflow": {("rst_sent", "listener_closed"): BACKLOG + 1},
}


def make_traffic(ns, mix: dict[str, int]) -> dict:
    """The host's resets, one scenario after the other; the burst's outcome where there is one."""
    facts = {}
    for scenario, n in mix.items():
        for _ in range(n):
            if scenario == "overflow":
                server = Background(ns, "server", "127.0.0.1", str(PORT), str(BACKLOG), "25")  # never accepts
                try:
                    facts = json.loads(ns.run("/usr/bin/python3", BURST, "clients", "127.0.0.1", str(PORT),
                                              str(CLIENTS), str(HOLD_S)).stdout)
                finally:
                    server.stop()                       # the queued connections are reset
            else:
                got = ns.scenario(scenario, "127.0.0.1", PORT)
                assert got.get("error", got.get("client_error")) in ("ECONNREFUSED", "ECONNRESET"), got
    return facts


def tally(pairs) -> dict[tuple[str, str], int]:
    return dict(Counter(pairs))


def otlp_tally(logs: list[dict], inode: int) -> dict[tuple[str, str], int]:
    """(event, reason) of the events and (connection, outcome) of the stories the OTLP receiver got
    from netns `inode`."""
    out = []
    for a in map(attrs, logs):
        name = a["event.name"].removeprefix("rsttrace.")
        if name == "connection" and a.get("rsttrace.server.netns.inode") == inode:
            out.append((name, a["rsttrace.outcome"]))
        elif "rsttrace.reason" in a and "network.local.port" in a and a.get("rsttrace.netns.inode") == inode:
            out.append((name, a["rsttrace.reason"]))
    return tally(out)


def reconciled_netns(summary: dict) -> list[str]:
    """The named netns of an OTLP summary's rsttrace.reconciliation (an array of kvlists): the one
    netns its rsttrace traced (the host's own netns has no `ip netns` name)."""
    names = []
    for row in summary["rsttrace.reconciliation"]["values"]:
        fields = {kv["key"]: kv["value"] for kv in row["kvlistValue"]["values"]}
        if "name" in fields:
            names.append(fields["name"]["stringValue"])
    return names


@pytest.fixture
def fleet_tracers(root, validator):
    """Starts rsttrace processes together (their loads overlap), waits for each to attach; kills any
    left running at the end."""
    started: list[Tracer] = []

    def _start(*arg_lists: list[str]) -> list[Tracer]:
        started.extend(Tracer(args, validator) for args in arg_lists)
        for t in started:
            t.wait_attached()
        return started
    yield _start
    for t in started:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


def test_a_fleet_of_three_hosts_exports_each_hosts_resets_to_shared_consumers(
        make_netns, fleet_tracers, prometheus, rsyslog):
    names = sorted(MIXES)
    hosts = {name: make_netns() for name in names}
    metrics = {name: f"127.0.0.1:{free_port()}" for name in names}
    receiver = OtlpReceiver()
    try:
        tracers = dict(zip(names, fleet_tracers(*(
            ["--json", "--port", str(PORT), "--netns", hosts[name].name, "--metrics", metrics[name],
             "--otlp", receiver.url, "--syslog", f"udp:127.0.0.1:{rsyslog.udp_port}"] for name in names))))
        prometheus.start(*metrics.values())
        before = {name: ns.counters() for name, ns in hosts.items()}
        with ThreadPoolExecutor(len(hosts)) as pool:          # the hosts make their traffic at the same time
            runs = {name: pool.submit(make_traffic, hosts[name], MIXES[name]) for name in names}
            facts = {name: run.result(timeout=120) for name, run in runs.items()}
        after = {name: ns.counters() for name, ns in hosts.items()}
        done_at = time.time()

        # What each host generated, per (event, reason), and what its kernel counted.
        expected: dict[str, dict[tuple[str, str], int]] = {}
        for name in names:
            want: Counter = Counter()
            for scenario, n in MIXES[name].items():
                for key, count in RESETS[scenario].items():
                    want[key] += n * count
            drops = after[name]["TcpExtListenOverflows"] - before[name]["TcpExtListenOverflows"]
            if "overflow" in MIXES[name]:
                assert drops > 0 and facts[name]["outcome"]["connected"] == BACKLOG + 1, facts[name]
                want["syn_dropped", "accept_queue_full"] = drops
                want["connection", "never_established"] = facts[name]["outcome"]["pending"]
            else:
                assert drops == 0
            sent = sum(n for (event, _), n in want.items() if event == "rst_sent")
            assert sent == after[name]["TcpOutRsts"] - before[name]["TcpOutRsts"], (name, dict(want))
            expected[name] = dict(want)
        assert len({frozenset(e.items()) for e in expected.values()}) == len(names)

        # Prometheus, queried through its HTTP API once it scraped each target after the traffic.
        instance = {target: name for name, target in metrics.items()}

        def scraped_after_traffic():
            rows = prometheus.query('rsttrace_last_update_timestamp_seconds{job="rsttrace"}')
            return {instance[r["metric"]["instance"]] for r in rows if float(r["value"][1]) > done_at} == set(names)
        wait_for(scraped_after_traffic, 40, lambda: f"a scrape of each rsttrace after the traffic; prometheus has "
                 f"{prometheus.query('rsttrace_last_update_timestamp_seconds')}, targets {prometheus.get('/api/v1/targets')}")
        scraped: dict[str, dict] = {name: {} for name in names}
        for r in prometheus.query('rsttrace_events_total{job="rsttrace"}'):
            m = r["metric"]
            assert (m["netns"], m["port"]) == (hosts[instance[m["instance"]]].name, str(PORT)), m
            scraped[instance[m["instance"]]][m["event"], m["reason"]] = int(r["value"][1])
        assert scraped == expected
        assert {instance[r["metric"]["instance"]]: r["value"][1] for r in prometheus.query('up{job="rsttrace"}')} \
            == dict.fromkeys(names, "1")
        assert {instance[r["metric"]["instance"]]: r["value"][1] for r in
                prometheus.query('rsttrace_records_lost_total{job="rsttrace"}')} == dict.fromkeys(names, "0")

        with ThreadPoolExecutor(len(tracers)) as pool:        # SIGINT to each; they flush and exit together
            stops = {name: pool.submit(t.stop) for name, t in tracers.items()}
            records = {name: stop.result(timeout=60) for name, stop in stops.items()}
    finally:
        receiver.close()
    assert {name: t.returncode for name, t in tracers.items()} == dict.fromkeys(names, 0)

    # Each rsttrace's own records: only its host's netns, written + aggregated + lost = counted in
    # the kernel (nothing lost or aggregated here), per reason equal to what the host generated.
    for name in names:
        recs, inode = records[name], hosts[name].inode
        summary = recs[-1]
        assert summary["type"] == "summary"
        assert {r["netns"]["inode"] for r in recs if r["type"] == "event"} == {inode}
        written = tally((r["event"], r["reason"]) for r in recs if r["type"] == "event")
        written.update(tally(("connection", r["outcome"]) for r in recs if r["type"] == "connection"))
        exact = {(event, reason): n for event, by in summary["exact_counts"].items() for reason, n in by.items()}
        assert (summary["lost"], summary["aggregated"], summary["uncounted"]) == (0, 0, 0), summary
        assert written == exact == expected[name], (name, summary.get("skipped_runs"))
        otlp = summary["otlp"]
        assert (otlp["failed"], otlp["dropped_queue_full"], otlp["unsent_at_exit"]) == (0, 0, 0), otlp

    # The OTLP receiver: each host's events and stories under its netns, and the three summaries.
    logs = receiver.records
    for name in names:
        assert otlp_tally(logs, hosts[name].inode) == expected[name], name
    prefix = "rsttrace.exact_counts."
    summaries = {}
    for a in map(attrs, logs):
        if a["event.name"] == "rsttrace.summary":
            [ns_name] = reconciled_netns(a)
            summaries[ns_name] = {tuple(k.removeprefix(prefix).split(".")): v for k, v in a.items()
                                  if k.startswith(prefix)}
    assert summaries == {hosts[name].name: expected[name] for name in names}
    # Every record each rsttrace handed over arrived, under its own resource (service.instance.id:
    # one per rsttrace process): its summary's `sent`, and the summary itself.
    by_instance: dict[str, list[dict]] = {}
    for record, resource in zip(logs, receiver.record_resources, strict=True):
        by_instance.setdefault(attrs(resource)["service.instance.id"], []).append(attrs(record))
    host_of_instance = {}
    for instance, mine in by_instance.items():
        [inode] = {a["rsttrace.netns.inode"] for a in mine if "rsttrace.netns.inode" in a}
        host_of_instance[instance] = next(name for name in names if hosts[name].inode == inode)
    assert sorted(host_of_instance.values()) == sorted(names)
    assert {host_of_instance[i]: len(mine) for i, mine in by_instance.items()} == \
        {name: records[name][-1]["otlp"]["sent"] + 1 for name in names}

    # rsyslogd: every record the three sent (coverage, events, stories, summary), told apart by PROCID.
    sent = {name: [r for r in records[name] if r["type"] in SENT_TYPES] for name in names}
    msgs = rsyslog.received(sum(map(len, sent.values())))
    pid = {str(t.proc.pid): name for name, t in tracers.items()}
    by_host: dict[str, list[dict]] = {name: [] for name in names}
    for m in msgs:
        by_host[pid[m["procid"]]].append(m)
    for name in names:
        mine = by_host[name]
        assert [m["msgid"] for m in mine] == [r["event"] if r["type"] == "event" else r["type"] for r in sent[name]]
        assert {m["params"]["netns"] for m in mine if m["msgid"] not in ("coverage", "summary")} == {str(hosts[name].inode)}
        assert tally((m["msgid"], m["params"].get("reason") or m["params"]["outcome"])
                     for m in mine if m["msgid"] not in ("coverage", "summary")) == expected[name]
        assert mine[-1]["params"]["lost"] == "0" and mine[-1]["params"]["aggregated"] == "0"
