"""Connections' stories: what a listener's drops did to each connection, checked client by client.

Every client of scripts/repro/story.py records its own fate (outcome, errno, and CLOCK_MONOTONIC
times around connect() and close()). Each test runs a real rsttrace beside it and finds, for each
client, the `connection` record rsttrace wrote for its 4-tuple, then holds the record to what the
client itself saw: outcome, errno, and the record's kernel times ordered against the client's own
clock where the kernel's order is exact (a story that a close() ends is ended inside that close()).
Sums over the records are reconciled with the netns' kernel counters where every count of the
counter belongs to a story (ListenDrops, TCPSynRetrans, TcpEstabResets).

Nothing here depends on the machine's speed: no rates, no latencies; only orders that the kernel
guarantees, and counts.
"""
from __future__ import annotations

import json
import subprocess
from collections import Counter, defaultdict

from conftest import BURST, REPO, Background, delta, drop_final_acks, events, unexplained

# Records are not checked against schema/rsttrace-v1.schema.json until it describes `connection` records:
# flip to True then.
VALIDATE = True
PORT = 8100
STORY = str(REPO / "scripts" / "repro" / "story.py")
STUCK_PORTS = (40000, 40001)
# A SYN is first retransmitted 1 s (TCP_TIMEOUT_INIT) after connect(): a client that connected
# sooner than this sent one SYN, and a client nothing dropped has no story.
SYN_RTO_NS = 1_000_000_000
LISTENER_KINDS = ("syn_dropped", "ack_dropped", "syn_cookie")


# -- scenario helpers -------------------------------------------------------------------------

def story(ns, *args: str, timeout: float = 50) -> dict:
    """Run story.py `args` in `ns`; its facts (the last JSON line)."""
    out = ns.run("/usr/bin/python3", STORY, *args, timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def traced_story(ns, tracer, *args: str) -> tuple[dict, dict, dict, list[dict]]:
    """story.py `args` in `ns` under rsttrace: its facts, the netns counters before and after, and
    rsttrace's records (none lost)."""
    t = start_tracer(tracer)
    before = ns.counters()
    facts = story(ns, *args)
    after = ns.counters()
    records = t.stop()
    assert records[-1]["lost"] == 0, records[-1]["lost"]
    return facts, before, after, records


class StoryStuck:
    """story.py stuck: clients whose handshake the listener has not completed, driven over stdin."""

    def __init__(self, ns, addr: str, port: int, n: int, first_port: int):
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "/usr/bin/python3", STORY, "stuck", addr,
                                      str(port), str(n), str(first_port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.facts = json.loads(self.proc.stdout.readline())

    def go(self) -> dict:
        out, _ = self.proc.communicate("go\n", timeout=30)
        return json.loads(out.strip().splitlines()[-1])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_tracer(tracer, *extra: str):
    return tracer("--json", "--port", str(PORT), *extra, validate=VALIDATE)


# -- what rsttrace wrote ----------------------------------------------------------------------

def connections(records, ns) -> list[dict]:
    """The `connection` records of stories with an end in netns `ns`."""
    def inode(end):
        return (end.get("netns") or {}).get("inode")
    return [r for r in records if r["type"] == "connection"
            and ns.inode in (inode(r["client"]), inode(r["server"]))]


def by_client_port(conns: list[dict]) -> dict[int, list[dict]]:
    found = defaultdict(list)
    for rec in sorted(conns, key=lambda r: r["ktime_ns"]):
        found[rec["client"]["port"]].append(rec)
    return found


def listener_events_of(records, ns) -> dict[int, list[dict]]:
    """The listener's drops (and cookies) in `ns`, by client port."""
    found = defaultdict(list)
    for ev in events(records, netns__inode=ns.inode):
        if ev["event"] in LISTENER_KINDS and ev["local"]["port"] == PORT:
            found[ev["remote"]["port"]].append(ev)
    return found


def per_listener(records, ns) -> dict:
    summary = records[-1]
    assert summary["type"] == "summary"
    rows = [row for row in summary["connections"]["per_listener"] if row["netns"] == ns.inode and row["port"] == PORT]
    assert len(rows) == 1, summary["connections"]
    return rows[0]


def brief(rec: dict) -> str:
    """A record, short, for assertion messages."""
    keep = ("outcome", "errno", "abandoned", "start", "start_ktime_ns", "ktime_ns", "ended_by", "drops",
            "retransmits", "resets_sent", "events", "explanation")
    return json.dumps({k: rec.get(k) for k in keep})


def check_refs(rec: dict, records: list[dict]) -> None:
    """The events a connection record names are event records of the output, of its connection, and
    its counts are those events."""
    port = rec["client"]["port"]
    for ref in rec["events"]:
        hits = [ev for ev in records if ev["type"] == "event" and ev["event"] == ref["event"]
                and ev["ktime_ns"] == ref["ktime_ns"] and ev["reason"] == ref["reason"]
                and port == (ev["local"]["port"] if ev["event"] == "rst_received" else ev["remote"]["port"])]
        assert len(hits) == 1, f"ref {ref} of {brief(rec)} names {len(hits)} event records"
    named = Counter(ref["event"] for ref in rec["events"])
    if len(rec["events"]) < 16:                   # every event named (stories.MAX_REFS)
        assert (named["syn_dropped"], named["ack_dropped"], named["syn_cookie"]) == (
            rec["drops"]["syn"], rec["drops"]["ack"], rec["drops"]["syn_cookies"]), brief(rec)


def counted_drops(rec: dict, client: dict, drops: list[dict]) -> None:
    """A story counts its connection's drops up to its end. Those before the client began to close()
    are in it for sure; one that the listener made while the client was closing (a SYN retransmitted
    just before it gave up) races the end on another CPU: in it, or only its own event."""
    settled = sum(d["ktime_ns"] < client["close_begin_ns"] for d in drops)
    racing = sum(client["close_begin_ns"] <= d["ktime_ns"] <= rec["ktime_ns"] for d in drops)
    assert 1 <= settled <= rec["drops"]["syn"] <= settled + racing, (brief(rec), [d["ktime_ns"] for d in drops])


def check_against_client(client: dict, rec: dict, drops: list[dict]) -> None:
    """One client's own record against rsttrace's record of its connection."""
    why = f"client {json.dumps(client)}\nrecord {brief(rec)}"
    # The story starts at connect() (seen by the kernel just after the client read its clock) or at
    # the first drop, later still.
    assert client["start_ns"] <= rec["start_ktime_ns"] <= rec["ktime_ns"], why
    if rec["start"] == "first_drop" and drops:
        assert rec["start_ktime_ns"] == min(d["ktime_ns"] for d in drops), why
    assert rec["duration_s"] == round((rec["ktime_ns"] - rec["start_ktime_ns"]) / 1e9, 6), why
    outcome = client["outcome"]
    if outcome == "gave_up":
        # Closed while connecting: SYN_SENT -> CLOSE happens inside that close().
        assert (rec["outcome"], rec["errno"], rec["abandoned"], rec["ended_by"]) == (
            "never_established", None, True, "client"), why
        assert client["close_begin_ns"] <= rec["ktime_ns"] <= client["close_end_ns"], why
        assert rec["delay_s"] is None, why
    elif outcome == "error" and client["connected_ns"] is None:
        # connect() failed: the kernel's SYN_SENT -> CLOSE before the client read the error.
        assert (rec["outcome"], rec["errno"], rec["abandoned"]) == ("never_established", client["errno"], False), why
        assert rec["ktime_ns"] <= client["end_ns"], why
    elif client["connected_ns"] is not None:
        # Connected as the client saw it. The story ends at the server's child's ESTABLISHED
        # ("established"), or at the client's socket leaving ESTABLISHED first ("client_only", or
        # "reset"). On loopback the child is established in the softirq that carries the client's
        # final ACK, usually before the client's poll() returns, but nothing orders it before the
        # client's clock read; what is exact: the story ends no later than the client's close(), which
        # would otherwise have ended it as client_only.
        assert rec["outcome"] in ("established", "client_only", "reset"), why
        assert rec["ktime_ns"] <= client["close_end_ns"], why
        if rec["outcome"] == "established":
            assert rec["ended_by"] == "server" and rec["errno"] is None and not rec["abandoned"], why
            assert rec["delay_s"] == rec["duration_s"] and rec["delay_s"] > 0, why
        elif rec["outcome"] == "client_only":
            # The server never had it: its final ACK met the full accept queue.
            assert rec["drops"]["ack"] >= 1 and rec["errno"] is None and rec["ended_by"] == "client", why
            assert rec["delay_s"] is None, why
        else:
            assert client["outcome"] == "reset" and rec["errno"] == "ECONNRESET", why
    else:
        raise AssertionError(f"a client story.py did not settle: {why}")


def check_clients(clients: list[dict], conns: list[dict], records: list[dict], ns) -> dict[int, dict]:
    """Each client: a record where a drop or a retransmitted SYN hurt it, none where nothing did.
    The clients' records, by port."""
    found = by_client_port(conns)
    drops = listener_events_of(records, ns)
    ours = {}
    for client in clients:
        port = client["local_port"]
        recs = found.get(port, [])
        hurt = bool(drops.get(port))
        slow = client["connected_ns"] is None or client["connected_ns"] - client["start_ns"] >= SYN_RTO_NS
        if not recs:
            assert not hurt and not slow, (
                f"no connection record for client {json.dumps(client)}; its listener events "
                f"{[(d['event'], d['ktime_ns']) for d in drops.get(port, [])]}")
            continue
        check_against_client(client, recs[0], drops.get(port, []))
        check_refs(recs[0], records)
        ours[port] = recs[0]
    return ours


def extra_stories(clients: list[dict], conns: list[dict]) -> str:
    """Clients with more than one connection record (one connection, one story): "" if none, else
    how many, and the first one's records."""
    found = by_client_port(conns)
    extra = {c["local_port"]: found[c["local_port"]] for c in clients if len(found.get(c["local_port"], [])) > 1}
    if not extra:
        return ""
    port, recs = next(iter(extra.items()))
    client = next(c for c in clients if c["local_port"] == port)
    return (f"{len(extra)} clients have {sum(map(len, extra.values()))} connection records; client {port}: "
            f"{json.dumps(client)}\n" + "\n".join(brief(r) for r in recs))


def check_per_listener(records, ns, conns: list[dict]) -> dict:
    """The summary's per-listener outcomes are the netns' connection records, counted."""
    row = per_listener(records, ns)
    counted = Counter(r["outcome"] for r in conns if (r["server"]["netns"] or {}).get("inode") == ns.inode
                      and r["server"]["port"] == PORT)
    assert (row["never_established"], row["established_late"], row["reset"], row["client_only"], row["open"]) == (
        counted["never_established"], counted["established"], counted["reset"], counted["client_only"],
        counted["open"]), (row, counted)
    return row


def retransmits(conns: list[dict]) -> int:
    return sum(r["retransmits"]["syn"] + r["retransmits"]["synack"] for r in conns)


def drops_of(conns: list[dict]) -> int:
    return sum(r["drops"]["syn"] + r["drops"]["ack"] for r in conns)


def server_named(rec: dict, pid: int) -> None:
    assert rec["server"]["process"] == {"pid": pid, "comm": "python3"}, brief(rec) + " server " + json.dumps(rec["server"])


# -- the tests --------------------------------------------------------------------------------

def test_burst_clients_that_never_connected_each_have_their_story(netns, tracer):
    # The case: a server that never accepts, its queue full (6 of 5), then 200 connects at
    # once. Each gives up after 1.5 s: its SYN (t=0) and the SYN's retransmit (t=1 s) both dropped.
    facts, before, after, records = traced_story(netns, tracer, "burst", "127.0.0.1", str(PORT), "5", "6", "200",
                                                 "1.5")
    summary = records[-1]

    clients = facts["clients"]
    fill = [c for c in clients if c["group"] == "fill"]
    burst = [c for c in clients if c["group"] == "burst"]
    assert [c["outcome"] for c in fill] == ["connected"] * 6, fill
    conns = connections(records, netns)
    ours = check_clients(clients, conns, records, netns)
    assert not {c["local_port"] for c in fill} & set(ours), "a fill client, which nothing hurt, has a story"

    gave_up = [c for c in burst if c["outcome"] == "gave_up"]
    assert gave_up, Counter(c["outcome"] for c in burst)
    missed = unexplained(records, netns, "TcpExtListenDrops")
    short, lost_slot = [], []
    for client in gave_up:
        rec = ours.get(client["local_port"])
        assert rec is not None, f"no connection record for {client}"
        # Where connect() was seen (its time kept in the connector slot of its socket) the story
        # starts there; a later connect() whose socket hashes to the same slot takes it
        # (bpf/owners.bpf.c: direct-mapped, 16384 slots: 200 sockets collide about once a run), and
        # the story then starts at its first drop — exactly that drop.
        assert rec["start"] in ("connect", "first_drop") and rec["retransmits"]["syn"] >= 1, brief(rec)
        if rec["start"] == "first_drop":
            lost_slot.append(client["local_port"])
        assert (rec["retransmits"]["synack"], rec["retransmits"]["data"], rec["drops"]["ack"], rec["resets_sent"]) == (
            0, 0, 0, 0), brief(rec)
        # Every SYN it sent was dropped at the full accept queue, the first and each retransmit, and
        # reported; the story counts those before its end.
        mine = [ev for ev in events(records, event="syn_dropped", netns__inode=netns.inode)
                if ev["remote"]["port"] == client["local_port"]]
        if len(mine) != 1 + rec["retransmits"]["syn"]:
            short.append(brief(rec))
        counted_drops(rec, client, mine)
        assert rec["client"]["process"] == {"pid": facts["client_pid"], "comm": "python3"}, brief(rec)
        assert rec["client"]["local"] and rec["server"]["local"], brief(rec)
        assert rec["client"]["netns"]["inode"] == rec["server"]["netns"]["inode"] == netns.inode, brief(rec)
        assert rec["server"]["netns"]["name"] == netns.name and (rec["server"]["addr"], rec["server"]["port"]) == (
            "127.0.0.1", PORT), brief(rec)
        assert all(ref["event"] == "syn_dropped" and ref["reason"] == "accept_queue_full" for ref in rec["events"])
        assert "never connected to 127.0.0.1:8100" in rec["explanation"], rec["explanation"]
        assert "full accept queue (6/5)" in rec["explanation"], rec["explanation"]
        assert "the client gave up after" in rec["explanation"], rec["explanation"]
        server_named(rec, facts["server_pid"])
    # A drop the kernel counted where no hook ran (the reconciliation's `unexplained`) is the only
    # excuse for a SYN not counted.
    assert len(short) <= missed, f"{len(short)} stories miss a SYN drop, {missed} unexplained: {short[:3]}"
    assert len(lost_slot) < len(gave_up) // 10, f"stories that did not start at connect(): {lost_slot}"
    # The fill clients connected before the burst, and nothing else was dropped or retransmitted in the
    # netns: every drop and every SYN retransmit the kernel counted is in a story.
    assert drops_of(conns) + missed == delta(before, after, "TcpExtListenDrops") > 0
    assert retransmits(conns) == delta(before, after, "TcpExtTCPSynRetrans") > 0
    extra = extra_stories(clients, conns)
    assert not extra, extra
    row = check_per_listener(records, netns, conns)
    assert row["never_established"] == len(gave_up)
    assert row["established_late"] == sum(r["outcome"] == "established" for r in conns)
    # The connections that got through (the 6 that filled the queue, and any burst client that
    # made it): the handshakes the listener completed, as the kernel counted them (PassiveOpens here).
    connected = [c for c in clients if c["connected_ns"] is not None]
    assert row["established"] == len(connected) == delta(before, after, "TcpPassiveOpens") >= 6, row
    assert summary["connections"]["written"] >= len(conns) and summary["connections"]["not_followed"] == 0


def stuck_at_full_queue(netns, tracer, abort_on_overflow: int):
    """Two clients whose final ACK the listener never took (nft), then a full accept queue (5/4), then
    their next segment (the data they send on "go") meets it: test_listen_queue's
    test_final_ack_meeting_a_full_accept_queue, with clients that record their own fate."""
    netns.sysctl("net.ipv4.tcp_abort_on_overflow", abort_on_overflow)
    t = start_tracer(tracer)
    server, facts, before, after = stuck_round(netns)
    records = t.stop()
    assert records[-1]["lost"] == 0, records[-1]["lost"]
    return server.facts, facts, before, after, records


def stuck_round(netns):
    """stuck_at_full_queue's clients and server, while a tracer runs: (server, facts, before, after)."""
    server = Background(netns, "server", "127.0.0.1", str(PORT), "4", "30")
    stuck = None
    try:
        drop_final_acks(netns, PORT, f"{STUCK_PORTS[0]}-{STUCK_PORTS[1]}")
        stuck = StoryStuck(netns, "127.0.0.1", PORT, 2, STUCK_PORTS[0])
        assert [c["outcome"] for c in stuck.facts["clients"]] == ["connected"] * 2, stuck.facts
        filled = json.loads(netns.run("/usr/bin/python3", BURST, "clients", "127.0.0.1", str(PORT), "5", "1.5").stdout)
        assert filled["outcome"].get("connected") == 5, filled          # the queue: 5 of 4
        netns.run("nft", "delete table inet rsttrace_test")
        before = netns.counters()
        facts = stuck.go()
        after = netns.counters()
    finally:
        if stuck is not None:
            stuck.stop()
        server.stop()
    return server, facts, before, after


def test_the_same_connection_in_two_netns_one_after_the_other_is_two_stories(make_netns, tracer):
    # Loopback in each netns, the same client ports: the same addresses and ports twice within a
    # minute. The kernel keys stories by them alone, and remembers one that ended (a late segment of
    # it starts no second story) — in its own listener's netns only, so the second netns's are told.
    spaces = [make_netns(), make_netns()]
    for ns in spaces:
        ns.sysctl("net.ipv4.tcp_abort_on_overflow", 1)
    t = start_tracer(tracer)
    rounds = [stuck_round(ns) for ns in spaces]
    records = t.stop()
    for ns, (_, facts, _, _) in zip(spaces, rounds):
        assert [c["errno"] for c in facts["clients"]] == ["ECONNRESET"] * 2, facts
        reset = sorted(r["client"]["port"] for r in connections(records, ns) if r["outcome"] == "reset")
        assert reset == list(STUCK_PORTS), [brief(r) for r in connections(records, ns)]


def test_abort_on_overflow_reset_clients_name_the_rst_that_reset_them(netns, tracer):
    server, facts, before, after, records = stuck_at_full_queue(netns, tracer, 1)
    clients = facts["clients"]
    assert [(c["outcome"], c["errno"]) for c in clients] == [("reset", "ECONNRESET")] * 2, clients
    conns = connections(records, netns)
    ours = check_clients(clients, conns, records, netns)
    for client in clients:
        rec = ours[client["local_port"]]
        why = f"client {json.dumps(client)}\nrecord {brief(rec)}"
        assert (rec["outcome"], rec["errno"], rec["abandoned"], rec["ended_by"]) == (
            "reset", "ECONNRESET", False, "client"), why
        assert rec["drops"]["ack"] >= 1, why
        # The RST answers the data sent after send_ns, and recv() saw ECONNRESET only once the
        # socket was closed (tcp_reset: sk_err, then tcp_done, under the socket's lock).
        assert client["send_ns"] <= rec["ktime_ns"] <= client["end_ns"], why
        assert rec["client"]["process"] == {"pid": facts["stuck_pid"], "comm": "python3"}, why
        assert rec["start"] == "connect", why
        assert "then was reset" in rec["explanation"] and "final ACK" in rec["explanation"], why
        [received] = [ev for ev in events(records, event="rst_received", netns__inode=netns.inode)
                      if ev["local"]["port"] == client["local_port"]]
        assert received["reset_by"] is not None, received
        assert received["reset_by"]["process"]["pid"] == server["server_pid"], received["reset_by"]
        assert received["reset_by"]["reason"] == "accept_queue_full", received["reset_by"]
        assert received["reset_by"]["netns"] == netns.inode, received["reset_by"]         # its inode
        [sent] = [ev for ev in events(records, event="rst_sent", netns__inode=netns.inode, reason="accept_queue_full")
                  if ev["remote"]["port"] == client["local_port"]]
        assert received["reset_by"]["ktime_ns"] == sent["ktime_ns"] <= received["ktime_ns"], (sent, received)
        assert client["send_ns"] <= received["ktime_ns"] <= client["end_ns"], received
        assert "accept queue was full" in received["explanation"], received["explanation"]
        assert {"event": "rst_received", "reason": received["reason"], "ktime_ns": received["ktime_ns"]} in rec["events"]
    assert delta(before, after, "TcpEstabResets") >= len(clients)
    # The stories start at the first ACK drop: the SYN-ACKs the listener resent while nft dropped the
    # final ACKs came before, and are counted by the kernel only.
    assert retransmits(conns) <= delta(before, after, "TcpExtTCPSynRetrans")
    # Each client's data met the full queue once, and the RST ended it: every drop is in a story.
    assert drops_of(conns) + unexplained(records, netns, "TcpExtListenDrops") == delta(
        before, after, "TcpExtListenDrops") >= len(clients)
    row = check_per_listener(records, netns, conns)
    assert row["reset"] == len(clients)
    pairs = records[-1]["connections"]["rst_pairs"]
    assert pairs["paired"] >= len(clients), pairs
    extra = extra_stories(clients, conns)
    assert not extra, extra
    wrong = []
    for client in clients:
        rec = ours[client["local_port"]]
        # The listener's RST is the story's: the record names it among its events, and counts it.
        named = sum(ref["event"] == "rst_sent" for ref in rec["events"])
        if not rec["resets_sent"] >= 1 or rec["resets_sent"] != named:
            wrong.append(f"resets_sent {rec['resets_sent']}, rst_sent events named {named}: {brief(rec)}")
        # The server exits right after the clients, before rsttrace reads the ring (it polls): its
        # name must come from what the kernel recorded at listen(), as for the drops' records.
        if rec["server"]["process"] != {"pid": server["server_pid"], "comm": "python3"}:
            wrong.append(f"server {rec['server']['process']}: {brief(rec)}")
    assert not wrong, "\n".join(wrong)


def test_without_abort_on_overflow_stuck_clients_end_client_only(netns, tracer):
    server, facts, before, after, records = stuck_at_full_queue(netns, tracer, 0)
    clients = facts["clients"]
    # Silent: each client's data is dropped with its ACK, again and again; it hears nothing in 2 s.
    assert [(c["outcome"], c["errno"]) for c in clients] == [("timeout", None)] * 2, clients
    assert "ECONNRESET" not in {c["errno"] for c in clients}
    conns = connections(records, netns)
    ours = check_clients(clients, conns, records, netns)
    for client in clients:
        rec = ours[client["local_port"]]
        why = f"client {json.dumps(client)}\nrecord {brief(rec)}"
        assert (rec["outcome"], rec["errno"], rec["abandoned"], rec["ended_by"]) == (
            "client_only", None, False, "client"), why
        assert rec["drops"]["ack"] >= 1 and rec["resets_sent"] == 0, why
        # The client's ESTABLISHED -> FIN_WAIT1 ends it: inside its close().
        assert client["close_begin_ns"] <= rec["ktime_ns"] <= client["close_end_ns"], why
        assert rec["start"] == "connect" and rec["client"]["process"] == {"pid": facts["stuck_pid"], "comm": "python3"}, why
        assert "the server never had the connection" in rec["explanation"], why
    assert delta(before, after, "TcpEstabResets") == 0
    assert not [ev for ev in events(records, event="rst_received", netns__inode=netns.inode)
                if ev["local"]["port"] in STUCK_PORTS]
    assert retransmits(conns) <= delta(before, after, "TcpExtTCPSynRetrans")
    row = check_per_listener(records, netns, conns)
    assert row["client_only"] == len(clients) and row["reset"] == 0
    for client in clients:
        server_named(ours[client["local_port"]], server["server_pid"])
    # One connection, one story: a segment of a client that already closed (its FIN, its data
    # resent) that meets the full queue again must not start a second story of the same connection.
    extra = extra_stories(clients, conns)
    assert not extra, extra
    assert row["open"] == 0, row


def test_slow_acceptor_clients_connect_late_with_the_delay_they_saw(netns, tracer):
    # 40 connects at a server with listen(5) that accepts one connection every 50 ms: those whose
    # SYN met the full queue connect when a retransmit finds room (1 s, 3 s, ...), or give up at 5 s.
    facts, before, after, records = traced_story(netns, tracer, "slow", "127.0.0.1", str(PORT), "5", "40", "0.05",
                                                 "5")
    clients = facts["clients"]
    conns = connections(records, netns)
    ours = check_clients(clients, conns, records, netns)

    late = [c for c in clients if c["connected_ns"] is not None and c["connected_ns"] - c["start_ns"] > 500_000_000]
    assert late, Counter(c["outcome"] for c in clients)
    for client in late:
        rec = ours[client["local_port"]]        # check_clients: a late client has its record
        why = f"client {json.dumps(client)}\nrecord {brief(rec)}"
        # established late, or — when the retransmitted SYN was answered with a cookie, or its final
        # ACK met the full accept queue — connected on the client's side only
        assert rec["outcome"] in ("established", "client_only"), why
        if rec["outcome"] == "established":
            assert rec["delay_s"] > 0 and rec["drops"]["syn"] + rec["retransmits"]["syn"] >= 1, why
            assert "late" in rec["explanation"], why
        server_named(rec, facts["server_pid"])
    on_time = [c for c in clients if c["connected_ns"] is not None and c["local_port"] not in ours]
    assert all(c["connected_ns"] - c["start_ns"] < SYN_RTO_NS for c in on_time)
    established = [r for r in conns if r["outcome"] == "established"]
    row = check_per_listener(records, netns, conns)
    assert row["established_late"] == len(established) > 0
    assert row["added_delay_s"] is not None and row["added_delay_s"]["p50"] is not None
    delays = sorted(r["delay_s"] for r in established)
    assert delays[0] <= row["added_delay_s"]["p50"] <= row["added_delay_s"]["p99"] <= delays[-1]
    # Every SYN retransmit here is a client whose SYN was dropped, in its story (seen equal); but a
    # SYN-ACK resent to a client whose story has ended (client_only) is the kernel's alone.
    assert retransmits(conns) <= delta(before, after, "TcpExtTCPSynRetrans")
    assert drops_of(conns) + unexplained(records, netns, "TcpExtListenDrops") <= delta(before, after, "TcpExtListenDrops")
    # One connection, one story (see the client_only test): a closed client's FIN that meets the full
    # queue starts no second story.
    extra = extra_stories(clients, conns)
    assert not extra, extra
    assert row["open"] == 0, row


def test_no_stories_flag_turns_it_off(netns, tracer):
    t = start_tracer(tracer, "--no-stories")
    facts = story(netns, "burst", "127.0.0.1", str(PORT), "5", "6", "10", "1.5")
    refused = netns.scenario("closed_port", "127.0.0.1", PORT)        # an RST this host sent, and received
    records = t.stop()
    assert Counter(c["outcome"] for c in facts["clients"]) == {"connected": 6, "gave_up": 10}
    assert events(records, event="syn_dropped", netns__inode=netns.inode)    # the drops are still reported
    assert not [r for r in records if r["type"] == "connection"]
    received = events(records, event="rst_received", netns__inode=netns.inode)
    assert [r for r in received if r["local"]["port"] == refused["client_port"]], received
    assert all("reset_by" not in r for r in received), received
    assert records[-1].get("connections") is None, records[-1].get("connections")
