"""Connections' stories told from one end: remote clients seen from the server's netns, and clients
whose SYNs a full SYN queue dropped.

As in test_stories.py, every client records its own fate (scripts/repro/story.py's client code, run
here against a server that is not forked beside it), and each of rsttrace's `connection` records is
held, client by client, to what the client saw; sums are reconciled with the netns' kernel counters.
Nothing depends on the machine's speed: only orders the kernel guarantees, and counts.
"""
from __future__ import annotations

import json
import subprocess
import textwrap
from collections import Counter

from conftest import REPO, Background, delta, drop_final_acks, events, unexplained
from test_stories import (StoryStuck, brief, by_client_port, check_against_client, check_refs, counted_drops,
                          extra_stories)

PORT = 8200
SERVER_ADDR, CLIENT_ADDR = "10.77.0.1", "10.77.0.2"
STUCK_FIRST_PORT = 41000

# story.py's clients, against a server of the test's own (story.py forks its own only).
CLIENTS = textwrap.dedent(f"""
    import json, os, sys
    sys.path.insert(0, {str(REPO / "scripts" / "repro")!r})
    import story
    from collections import Counter

    def clients(addr, port, fill, n, timeout_s, hold_s):
        done = []
        for _ in range(fill):                  # one at a time, each settled: they fill the queue
            one = story.start(addr, port, story.new_sockets(addr, 1), "fill")
            story.settle(one, 5.0, 0.0)
            done += one
        burst = story.start(addr, port, story.new_sockets(addr, n), "burst")
        story.settle(done + burst, timeout_s, hold_s)
        done += burst
        story.close_all(done)
        records = [rec for _, rec in done]
        return {{"client_pid": os.getpid(), "clients": records,
                 "outcome": dict(Counter(rec["outcome"] for rec in records))}}

    def slow_server(addr, port, backlog, every):
        pid = story.fork_server(addr, port, backlog, every)
        print(json.dumps({{"server_pid": pid}}), flush=True)
        sys.stdin.readline()
        story.stop_server(pid)
        print(json.dumps({{"server_pid": pid, "stopped": True}}), flush=True)

    cmd = sys.argv[1]
    if cmd == "clients":
        a = sys.argv[2:]
        print(json.dumps(clients(a[0], int(a[1]), int(a[2]), int(a[3]), float(a[4]), float(a[5]))), flush=True)
    else:
        a = sys.argv[2:]
        slow_server(a[0], int(a[1]), int(a[2]), float(a[3]))
""")


def script(tmp_path) -> str:
    path = tmp_path / "remote_clients.py"
    path.write_text(CLIENTS)
    return str(path)


def run_clients(ns, tmp_path, addr: str, fill: int, n: int, timeout_s: float, hold_s: float = 0.0) -> dict:
    out = ns.run("/usr/bin/python3", script(tmp_path), "clients", addr, str(PORT), str(fill), str(n), str(timeout_s),
                 str(hold_s), timeout=50)
    return json.loads(out.stdout.strip().splitlines()[-1])


class SlowServer:
    """story.py's server that accepts (and closes) one connection every `every` s, in `ns`."""

    def __init__(self, ns, tmp_path, addr: str, backlog: int, every: float):
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "/usr/bin/python3", script(tmp_path), "server",
                                      addr, str(PORT), str(backlog), str(every)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.facts = json.loads(self.proc.stdout.readline())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.communicate("stop\n", timeout=30)


def veth_pair(server_ns, client_ns) -> None:
    server_ns.run("ip", "link", "add", "rt-srv", "type", "veth", "peer", "name", "rt-cli", "netns", client_ns.name)
    server_ns.run("ip", "addr", "add", f"{SERVER_ADDR}/24", "dev", "rt-srv")
    client_ns.run("ip", "addr", "add", f"{CLIENT_ADDR}/24", "dev", "rt-cli")
    server_ns.run("ip", "link", "set", "rt-srv", "up")
    client_ns.run("ip", "link", "set", "rt-cli", "up")


def start_tracer(tracer, *extra: str):
    return tracer("--json", "--port", str(PORT), *extra)


def conns_of_server(records, ns) -> list[dict]:
    return [r for r in records if r["type"] == "connection" and r["server"]["port"] == PORT
            and (r["server"]["netns"] or {}).get("inode") == ns.inode]


def drops_by_port(records, ns) -> dict[int, list[dict]]:
    """The listener's syn_dropped / ack_dropped / syn_cookie events in `ns`, by client port."""
    found: dict[int, list[dict]] = {}
    for ev in events(records, netns__inode=ns.inode):
        if ev["event"] in ("syn_dropped", "ack_dropped", "syn_cookie") and ev["local"]["port"] == PORT:
            found.setdefault(ev["remote"]["port"], []).append(ev)
    return found


def only_record(found: dict, client: dict) -> dict:
    recs = found.get(client["local_port"], [])
    assert len(recs) == 1, f"client {json.dumps(client)} has {len(recs)} records: {[brief(r) for r in recs]}"
    return recs[0]


# -- the tests --------------------------------------------------------------------------------

def remote_never_established(server_ns, client_ns, tracer, tmp_path):
    # Case A: listen(1) never accepting, its queue filled (2 of 1) by two clients; then 20 clients that
    # give up after 1.5 s. rsttrace watches the server's netns only: the clients' give-up is invisible,
    # their stories are open when it stops.
    t = start_tracer(tracer, "--netns", server_ns.name)
    server = Background(server_ns, "server", SERVER_ADDR, str(PORT), "1", "30")
    try:
        s_before, c_before = server_ns.counters(), client_ns.counters()
        facts = run_clients(client_ns, tmp_path, SERVER_ADDR, 2, 20, 1.5)
        s_after, c_after = server_ns.counters(), client_ns.counters()
    finally:
        server.stop()
    records = t.stop()
    assert records[-1]["lost"] == 0, records[-1]["lost"]
    clients = facts["clients"]
    fill = [c for c in clients if c["group"] == "fill"]
    burst = [c for c in clients if c["group"] == "burst"]
    assert [c["outcome"] for c in fill] == ["connected"] * 2, fill
    assert [c["outcome"] for c in burst] == ["gave_up"] * 20, Counter(c["outcome"] for c in burst)

    conns = conns_of_server(records, server_ns)
    found = by_client_port(conns)
    drops = drops_by_port(records, server_ns)
    assert not {c["local_port"] for c in fill} & set(found), "a fill client, which nothing hurt, has a story"
    assert not {c["local_port"] for c in fill} & set(drops)
    wrong = []
    for client in burst:
        rec = only_record(found, client)
        mine = drops.get(client["local_port"], [])
        why = f"client {json.dumps(client)}\nrecord {brief(rec)}\nclient {json.dumps(rec['client'])}"
        # The honest answer: no end of it was seen; rsttrace ended it when it stopped.
        assert (rec["outcome"], rec["errno"], rec["abandoned"], rec["ended_by"], rec["delay_s"]) == (
            "open", None, False, "exit", None), why
        assert rec["client"] == {"addr": CLIENT_ADDR, "port": client["local_port"], "local": False, "netns": None,
                                 "process": None}, why
        assert rec["server"]["local"] and rec["server"]["netns"]["inode"] == server_ns.inode, why
        assert (rec["server"]["addr"], rec["server"]["process"]) == (
            SERVER_ADDR, {"pid": server.facts["server_pid"], "comm": "python3"}), why
        # connect() was in a netns rsttrace does not watch: the story starts at the first drop.
        assert rec["start"] == "first_drop" and rec["start_ktime_ns"] == min(d["ktime_ns"] for d in mine), why
        assert client["start_ns"] <= rec["start_ktime_ns"] <= client["close_begin_ns"], why
        assert client["close_end_ns"] <= rec["ktime_ns"], why
        # open until rsttrace exits (the client's close() is in a netns it does not watch): every drop
        assert rec["drops"]["syn"] == len(mine) >= 1, why
        assert all(d["event"] == "syn_dropped" and d["reason"] == "accept_queue_full" for d in mine), why
        assert (rec["drops"]["ack"], rec["drops"]["syn_cookies"], rec["resets_sent"]) == (0, 0, 0), why
        check_refs(rec, records)
        if rec["retransmits"]["syn"] != 0:
            wrong.append(f"retransmits.syn {rec['retransmits']['syn']} counted in an unwatched netns: {why}")
    # Every SYN the burst sent (one each, and each retransmit its netns counted) was dropped at the
    # server's full queue, and is in a story.
    sent = len(burst) + delta(c_before, c_after, "TcpExtTCPSynRetrans")
    syn_drops = sum(r["drops"]["syn"] for r in conns)
    missed = unexplained(records, server_ns, "TcpExtListenDrops")
    assert syn_drops + missed == delta(s_before, s_after, "TcpExtListenDrops") == sent, (
        syn_drops, missed, delta(s_before, s_after, "TcpExtListenDrops"), sent)
    assert len(conns) == len(burst), [brief(r) for r in conns if r["client"]["port"] not in found]
    extra = extra_stories(clients, conns)
    assert not extra, extra
    return wrong


def remote_established_late(server_ns, client_ns, tracer, tmp_path):
    # Case B: listen(5), one accept every 50 ms, 40 connects at once with a 5 s timeout: those whose
    # SYN met the full queue connect when a retransmit finds room. Without SYN cookies: a retransmitted
    # SYN answered with a cookie whose final ACK then meets the full accept queue leaves the server
    # nothing (no request to resend a SYN-ACK from), and the client, connected as it sees it, closes:
    # seen from the server alone that story is honestly `open`. With a request sock, the server resends
    # its SYN-ACK, the client's ACK comes again, and the child is established while the client holds
    # its connection open (3 s).
    server_ns.sysctl("net.ipv4.tcp_syncookies", 0)
    t = start_tracer(tracer, "--netns", server_ns.name)
    server = SlowServer(server_ns, tmp_path, SERVER_ADDR, 5, 0.05)
    try:
        s_before = server_ns.counters()
        facts = run_clients(client_ns, tmp_path, SERVER_ADDR, 0, 40, 5.0, 3.0)
        s_after = server_ns.counters()
    finally:
        server.stop()
    records = t.stop()
    assert records[-1]["lost"] == 0, records[-1]["lost"]
    clients = facts["clients"]
    conns = conns_of_server(records, server_ns)
    found = by_client_port(conns)
    drops = drops_by_port(records, server_ns)
    late = [c for c in clients if c["connected_ns"] is not None and c["connected_ns"] - c["start_ns"] > 500_000_000]
    assert late, Counter(c["outcome"] for c in clients)
    wrong = []
    for client in late:
        rec = only_record(found, client)
        mine = drops.get(client["local_port"], [])
        why = f"client {json.dumps(client)}\nrecord {brief(rec)}\nclient {json.dumps(rec['client'])}"
        assert (rec["outcome"], rec["ended_by"], rec["errno"], rec["abandoned"]) == (
            "established", "server", None, False), why
        assert rec["delay_s"] == rec["duration_s"] > 0 and rec["drops"]["syn"] >= 1, why
        assert rec["client"] == {"addr": CLIENT_ADDR, "port": client["local_port"], "local": False, "netns": None,
                                 "process": None}, why
        assert rec["start"] == "first_drop" and rec["start_ktime_ns"] == min(d["ktime_ns"] for d in mine), why
        assert client["start_ns"] <= rec["start_ktime_ns"] <= rec["ktime_ns"], why
        assert rec["drops"]["syn"] == sum(d["event"] == "syn_dropped" for d in mine), why
        assert "late" in rec["explanation"], why
        check_refs(rec, records)
        if rec["retransmits"]["syn"] != 0:
            wrong.append(f"retransmits.syn {rec['retransmits']['syn']} counted in an unwatched netns: {why}")
    # Client by client: a record where the listener dropped something of it, none where it did not.
    for client in clients:
        recs = found.get(client["local_port"], [])
        hurt = [d for d in drops.get(client["local_port"], []) if d["event"] != "syn_cookie"]
        assert bool(recs) == bool(hurt), f"client {json.dumps(client)}: {len(recs)} records, drops {hurt}"
    assert {r["client"]["port"] for r in conns} <= {c["local_port"] for c in clients}
    missed = unexplained(records, server_ns, "TcpExtListenDrops")
    assert sum(r["drops"]["syn"] + r["drops"]["ack"] for r in conns) + missed == delta(
        s_before, s_after, "TcpExtListenDrops") > 0
    extra = extra_stories(clients, conns)
    assert not extra, extra
    return wrong


def test_remote_clients_story_told_from_the_server_side(make_netns, tracer, tmp_path):
    server_ns, client_ns = make_netns(), make_netns()
    veth_pair(server_ns, client_ns)
    wrong = remote_never_established(server_ns, client_ns, tracer, tmp_path)
    wrong += remote_established_late(server_ns, client_ns, tracer, tmp_path)
    assert not wrong, "\n".join(wrong[:3]) + f"\n({len(wrong)} in all)"


def syn_queue_flood(netns, tracer, tmp_path, syncookies: int, n: int):
    """listen(8) never accepting; 9 clients whose final ACK nft drops hold the SYN queue full (9
    request socks of 8: full is more than the backlog); then n clients that give up after 1.5 s."""
    netns.sysctl("net.ipv4.tcp_syncookies", syncookies)
    t = start_tracer(tracer)
    server = Background(netns, "server", "127.0.0.1", str(PORT), "8", "40")
    stuck = None
    try:
        drop_final_acks(netns, PORT, f"{STUCK_FIRST_PORT}-{STUCK_FIRST_PORT + 8}")
        stuck = StoryStuck(netns, "127.0.0.1", PORT, 9, STUCK_FIRST_PORT)
        assert [c["outcome"] for c in stuck.facts["clients"]] == ["connected"] * 9, stuck.facts
        before = netns.counters()
        facts = run_clients(netns, tmp_path, "127.0.0.1", 0, n, 1.5)
        after = netns.counters()
    finally:
        if stuck is not None:
            stuck.stop()
        server.stop()
    records = t.stop()
    assert records[-1]["lost"] == 0, records[-1]["lost"]
    return server.facts, stuck.facts, facts, before, after, records


def test_syn_queue_flood_without_cookies_clients_stories(netns, tracer, tmp_path):
    server, stuck, facts, before, after, records = syn_queue_flood(netns, tracer, tmp_path, 0, 10)
    clients = facts["clients"]
    assert [c["outcome"] for c in clients] == ["gave_up"] * 10, Counter(c["outcome"] for c in clients)
    conns = conns_of_server(records, netns)
    found = by_client_port(conns)
    drops = drops_by_port(records, netns)
    for client in clients:
        rec = only_record(found, client)
        mine = drops.get(client["local_port"], [])
        why = f"client {json.dumps(client)}\nrecord {brief(rec)}"
        check_against_client(client, rec, mine)       # never_established, abandoned, ended in its close()
        counted_drops(rec, client, mine)              # its drops up to its end
        assert all(d["event"] == "syn_dropped" and d["reason"] == "syn_queue_full" for d in mine), why
        assert all(ref["event"] == "syn_dropped" and ref["reason"] == "syn_queue_full" for ref in rec["events"]), why
        # Each SYN it sent met the full SYN queue, the first and each retransmit: its events.
        assert len(mine) == 1 + rec["retransmits"]["syn"], why
        assert rec["start"] == "connect" and rec["client"]["local"] and rec["client"]["netns"]["inode"] == netns.inode, why
        assert rec["client"]["process"] == {"pid": facts["client_pid"], "comm": "python3"}, why
        assert rec["server"]["process"] == {"pid": server["server_pid"], "comm": "python3"}, why
        check_refs(rec, records)
    # The stuck clients connected at once (their requests sit in the SYN queue): no story.
    assert not {c["local_port"] for c in stuck["clients"]} & set(found)
    queue_full = [ev for ev in events(records, event="syn_dropped", netns__inode=netns.inode, reason="syn_queue_full")
                  if ev["local"]["port"] == PORT]
    assert len(queue_full) + unexplained(records, netns, "TcpExtTCPReqQFullDrop") == delta(
        before, after, "TcpExtTCPReqQFullDrop") > 0
    assert sum(r["drops"]["syn"] for r in conns) + unexplained(records, netns, "TcpExtListenDrops") == delta(
        before, after, "TcpExtListenDrops")
    # TCPSynRetrans counts the SYN-ACKs the listener resent to the stuck clients too (storyless).
    assert sum(r["retransmits"]["syn"] for r in conns) <= delta(before, after, "TcpExtTCPSynRetrans")
    assert len(conns) == len(clients), [brief(r) for r in conns]
    assert delta(before, after, "TcpExtSyncookiesSent") == 0


def test_syn_queue_flood_with_cookies_clients_without_drops_have_no_story(netns, tracer, tmp_path):
    server, stuck, facts, before, after, records = syn_queue_flood(netns, tracer, tmp_path, 1, 6)
    clients = facts["clients"]
    assert [c["outcome"] for c in clients] == ["connected"] * 6, Counter(c["outcome"] for c in clients)
    conns = conns_of_server(records, netns)
    found = by_client_port(conns)
    drops = drops_by_port(records, netns)
    cookies = events(records, event="syn_cookie", netns__inode=netns.inode)
    assert len(cookies) == delta(before, after, "TcpExtSyncookiesSent") >= len(clients)
    for client in clients:
        mine = drops.get(client["local_port"], [])
        if all(d["event"] == "syn_cookie" for d in mine):
            assert client["local_port"] not in found, (
                f"client {json.dumps(client)}, only cookies {mine}, has a story: {[brief(r) for r in found[client['local_port']]]}")
    assert not {c["local_port"] for c in stuck["clients"]} & set(found)
    assert delta(before, after, "TcpExtTCPReqQFullDrop") == 0
