"""The terminal UI's panels, drawn from fixed records (the same dicts every sink gets) on rich's
recording console; the screen's life cycle on a fake terminal (alternate screen left, cursor shown,
NO_COLOR honoured); bounded memory under an event storm."""
from __future__ import annotations

import io
import re

import pytest
from click.testing import CliRunner
from rich.console import Console

from tracer import cli
from tracer.enrich import reasons
from tracer.enrich.reasons import CATALOG
from tracer.events.decode import Event
from tracer.sinks import records
from tracer.sinks import ui

T0 = 1_763_804_626_123_456_789     # 2025-11-22T09:43:46.123456Z


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def event(kind="rst_sent", kernel_reason="TCP_ABORT_ON_CLOSE", verdict="none", local=("127.0.0.1", 8100),
          remote=("127.0.0.1", 51234), state="CLOSE", pid=4242, comm="nginx", unread=4096, queues=None, t=0,
          netns_name="web") -> dict:
    """An event record built the way the session builds it (records.event_record)."""
    ev = Event(kind=kind, ktime_ns=1, time_ns=T0 + t, family="ipv4", local_addr=local[0], local_port=local[1],
               remote_addr=remote[0], remote_port=remote[1], state=state, netns=4026532000,
               kernel_reason=kernel_reason, softirq=pid is None, task_pid=pid or 0, task_comm=comm or "",
               task_uid=0, skaddr=1, sock_cookie=0, sock_ino=7, unread_bytes=unread, linger=False,
               linger_jiffies=0, orphan=False, tcp_flags=0x02 if kind == "syn_dropped" or kernel_reason == "NO_SOCKET"
               else 0, callers=[], queues=queues, verdict=verdict, netns_name=netns_name)
    ev.reason = reasons.classify(ev)
    ev.process = {"pid": pid, "comm": comm, "uid": 0, "source": "task"} if pid else None
    ev.explanation = reasons.explain(ev)
    return records.event_record(ev)


COVERAGE = {
    "schema": "rsttrace/1", "type": "coverage", "time": "2025-11-22T09:43:45.000000Z", "kernel": "6.18.44-test",
    "filters": {"ports": [8100, 8443], "pid": None, "family": None, "reasons": []}, "startup_ms": 301.4,
    "hooks": {"rst_sent": {"hook": "tracepoint:tcp:tcp_send_reset", "note": "kernel reason from the tracepoint"},
              "rst_received": {"hook": "tracepoint:tcp:tcp_receive_reset", "note": ""},
              "syn_dropped": {"hook": None, "note": "listen-queue hooks not loaded in this build"},
              "ack_dropped": {"hook": None, "note": "listen-queue hooks not loaded in this build"}},
    "blind_spots": ["listeners in netns created before start are seen on their first SYN"],
}

LISTENERS = {
    "schema": "rsttrace/1", "type": "listeners", "time": "2025-11-22T09:43:47.000000Z",
    "listeners": [
        {"netns": {"inode": 4026532000, "name": "web"}, "local": {"addr": "0.0.0.0", "port": 8443},
         "process": {"pid": 77, "comm": "envoy", "uid": 0, "source": "listener_owner"},
         "accept_qlen": 2, "accept_qmax": 128, "backlog": 511, "somaxconn": 128, "binding_limit": "somaxconn",
         "syn_qlen": 0, "syn_qmax": 128, "drops": 0, "drops_per_s": 0.0},
        {"netns": {"inode": 4026532000, "name": "web"}, "local": {"addr": "127.0.0.1", "port": 8100},
         "process": {"pid": 4242, "comm": "burst-server", "uid": 0, "source": "listener_owner"},
         "accept_qlen": 6, "accept_qmax": 5, "backlog": 5, "somaxconn": 4096, "binding_limit": "listen_backlog",
         "syn_qlen": 3, "syn_qmax": 256, "drops": 48, "drops_per_s": 24.0},
    ],
}

QUIET_KERNEL = {"TcpOutRsts": 0, "TcpEstabResets": 0, "TcpExtTCPAbortOnClose": 0, "TcpExtListenOverflows": 0,
                "TcpExtListenDrops": 0, "TcpExtSyncookiesSent": 0}
RECONCILIATION = {
    "schema": "rsttrace/1", "type": "reconciliation", "time": "2025-11-22T09:43:48.000000Z",
    "netns": [{"inode": 4026531840, "name": "host", "rsttrace": {}, "kernel": QUIET_KERNEL,
               "coverage_pct": {"rst_sent": None, "listen_drops": None, "syn_cookie": None}},
              {"inode": 4026532000, "name": "web",
               "rsttrace": {"rst_sent": 3, "rst_received": 3, "syn_dropped": 48},
               "kernel": {**QUIET_KERNEL, "TcpOutRsts": 3, "TcpEstabResets": 3, "TcpExtListenOverflows": 50,
                          "TcpExtListenDrops": 50},
               "coverage_pct": {"rst_sent": 100.0, "listen_drops": 96.0, "syn_cookie": None}}],
    "note": "kernel counters cover every port of the netns",
}

SUMMARY = {
    "schema": "rsttrace/1", "type": "summary", "time": "2025-11-22T09:44:00.000000Z", "duration_s": 14.5,
    "events": {"rst_sent": {"closed_with_unread_data": 2, "no_listener": 1}, "rst_received": {"peer_reset": 3},
               "syn_dropped": {"accept_queue_full": 1}},
    "exact_counts": {"rst_sent": {"closed_with_unread_data": 2, "no_listener": 1}, "rst_received": {"peer_reset": 3},
                     "syn_dropped": {"accept_queue_full": 1}},
    "delivered": 7, "lost": 0,
    "kernel_counters": {"netns": "rsttrace's own", "delta": {"TcpOutRsts": 3, "TcpEstabResets": 0}},
    "reconciliation": RECONCILIATION["netns"],
}


def incident_events() -> list[dict]:
    """The two seed incidents in miniature: a proxy aborting its upstream, a refused connect, an overflow."""
    return [
        event(t=1_000_000),
        event("rst_received", None, local=("127.0.0.1", 51234), remote=("127.0.0.1", 8100), state="ESTABLISHED",
              pid=5151, comm="java", unread=0, t=1_100_000),
        event("rst_sent", "NO_SOCKET", local=("127.0.0.1", 9), remote=("127.0.0.1", 40000), state=None, pid=None,
              comm=None, unread=None, t=2_000_000),
        event("rst_received", None, local=("127.0.0.1", 40000), remote=("127.0.0.1", 9), state="SYN_SENT",
              pid=5152, comm="curl", unread=0, t=2_100_000),
        event(t=3_000_000),
        event("rst_received", None, local=("127.0.0.1", 51236), remote=("127.0.0.1", 8100), state="ESTABLISHED",
              pid=5151, comm="java", unread=0, t=3_100_000),
        event("syn_dropped", None, verdict="accept_queue_full", remote=("127.0.0.1", 52000), state="LISTEN",
              pid=4242, comm="burst-server", unread=None, t=4_000_000,
              queues={"accept_qlen": 6, "accept_qmax": 5, "syn_qlen": 3, "syn_qmax": 256, "backlog": 5,
                      "binding_limit": "listen_backlog",
                      "sysctls": {"somaxconn": 4096, "tcp_max_syn_backlog": 2048, "tcp_syncookies": 1,
                                  "tcp_abort_on_overflow": 0}}),
    ]


def loaded_state(*extra: dict, clock: Clock | None = None) -> ui.UiState:
    clock = clock or Clock()
    state = ui.UiState(clock=clock)
    for rec in [COVERAGE, *incident_events(), *extra]:
        state.apply(rec)
    return state


def draw(renderable, width=160, height=None) -> str:
    console = Console(record=True, width=width, height=height, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.export_text()


def styles_of(text_obj, needle: str) -> set[str]:
    """The styles rich gives the characters of `needle` inside a rich Text."""
    plain = text_obj.plain
    start = plain.index(needle)
    return {str(span.style) for span in text_obj.spans if span.start <= start < span.end}


# -- header ------------------------------------------------------------------------------------

def test_header_shows_host_kernel_filters_hooks_and_what_this_kernel_cannot_show():
    clock = Clock()
    state = loaded_state(clock=clock)
    clock.now += 83
    text = draw(ui.header_panel(state, "db-7"))
    assert "rsttrace 0.1.0 on db-7 · kernel 6.18.44-test · up 00:01:23 · attached in 301 ms" in text
    assert "filters: ports 8100,8443 · pid any · ipv4+ipv6 · reasons all" in text
    assert "hooks: rst_sent tracepoint:tcp:tcp_send_reset · rst_received tracepoint:tcp:tcp_receive_reset" in text
    assert "cannot see: syn_dropped, ack_dropped (listen-queue hooks not loaded in this build)" in text
    assert "blind spot: listeners in netns created before start are seen on their first SYN" in text


def test_header_groups_event_kinds_by_hook_and_marks_inferred_ones():
    cov = {**COVERAGE, "hooks": {
        "rst_sent": {"hook": "tracepoint:tcp:tcp_send_reset", "note": "kernel reason from the tracepoint"},
        "syn_dropped": {"hook": "raw_tracepoint:net:netif_receive_skb", "note": "inferred: each SYN to a known listener"},
        "syn_cookie": {"hook": "raw_tracepoint:net:netif_receive_skb", "note": "inferred: each SYN to a known listener"},
        "ack_dropped": {"hook": "tracepoint:skb:kfree_skb", "note": "kernel drop reason TCP_LISTEN_OVERFLOW"}}}
    state = ui.UiState(clock=Clock())
    state.apply(cov)
    text = " ".join(draw(ui.header_panel(state, "db-7"), width=300).replace("│", " ").split())
    assert ("hooks: rst_sent tracepoint:tcp:tcp_send_reset · syn_dropped+syn_cookie "
            "raw_tracepoint:net:netif_receive_skb (inferred) · ack_dropped tracepoint:skb:kfree_skb") in text
    assert "cannot see" not in text


# -- listeners -----------------------------------------------------------------------------------

def test_listeners_panel_says_so_when_there_is_no_listener_data():
    assert "no listener data" in draw(ui.listeners_panel(loaded_state()))


def test_listener_gauge_shows_the_overflowing_accept_queue_full_and_red_with_the_binding_limit():
    text = draw(ui.listeners_panel(loaded_state(LISTENERS)))
    lines = text.splitlines()
    [burst] = [ln for ln in lines if "127.0.0.1:8100" in ln]
    assert "burst-server/4242" in burst and "web" in burst
    assert "█" * 16 + " 6/5 FULL" in burst                       # queue length above its limit
    assert "5 = backlog (somaxconn 4096)" in burst                 # min(backlog, somaxconn): backlog binds
    assert "3/256" in burst and " 48 " in burst and "24.0" in burst
    [calm] = [ln for ln in lines if "0.0.0.0:8443" in ln]
    assert "2/128" in calm and "FULL" not in calm and "128 = somaxconn (backlog 511)" in calm
    # Worst listener first (drops per second).
    assert lines.index(burst) < lines.index(calm)
    assert "bold red" in styles_of(ui.gauge(6, 5), "6/5")
    assert "green" in styles_of(ui.gauge(2, 128), "2/128")
    assert "yellow" in styles_of(ui.gauge(5, 5), "5/5") and "FULL" not in ui.gauge(5, 5).plain   # at, not over


def test_listen_backlog_zero_still_draws_a_full_gauge():
    assert ui.gauge(1, 0, width=4).plain == "████ 1/0 FULL"
    assert ui.gauge(0, 0, width=4).plain == "░░░░ 0/0"
    assert ui.gauge(None, 5).plain == "-"


# -- reasons ---------------------------------------------------------------------------------------

def test_reasons_are_counted_worst_first_with_rates_and_the_catalog_explanation():
    clock = Clock()
    state = loaded_state(clock=clock)
    clock.now += 4
    rates, total = state.rates()
    text = draw(ui.reasons_panel(state, rates), width=300)
    rows = [ln for ln in text.splitlines() if re.search(r"\s(rst_sent|rst_received|syn_dropped)\s", ln)]
    names = [re.search(r"[✖▲·]\s+(\w+)", ln).group(1) for ln in rows]
    # errors before warnings, then by count: peer_reset (3) before no_listener (1)
    assert names == ["closed_with_unread_data", "accept_queue_full", "peer_reset", "no_listener"]
    assert re.search(r"✖\s+closed_with_unread_data\s+rst_sent\s+2\s+0\.5\s", rows[0])
    assert re.search(r"▲\s+peer_reset\s+rst_received\s+3\s+0\.8\s", rows[2])
    assert CATALOG["closed_with_unread_data"].one_line() in rows[0]
    assert total == pytest.approx(7 / 4)


def test_rates_cover_only_the_last_window():
    clock = Clock()
    state = ui.UiState(clock=clock)
    state.apply(COVERAGE)
    for i in range(30):
        state.apply(event(t=i))
        clock.now += 1
        state.rates()                    # one redraw a second, as the screen does
    clock.now += ui.RATE_WINDOW_S + 1    # silence for longer than the window
    state.rates()
    rates, total = state.rates()
    assert total == 0 and rates[("rst_sent", "closed_with_unread_data")] == 0
    assert state.counts[("rst_sent", "closed_with_unread_data")] == 30


def test_no_resets_yet_is_said_not_left_blank():
    state = ui.UiState(clock=Clock())
    state.apply(COVERAGE)
    assert "no resets or drops yet" in draw(ui.reasons_panel(state, {}))


# -- events ----------------------------------------------------------------------------------------

def test_event_rows_show_time_what_reason_endpoints_state_process_and_queues():
    text = draw(ui.events_table(incident_events()), width=200)
    rows = text.splitlines()[1:]
    assert re.search(r"09:43:46\.124\s+rst_sent\s+closed_with_unread_data\s+127\.0\.0\.1:8100\s+→\s+"
                     r"127\.0\.0\.1:51234\s+CLOSE\s+web\s+nginx/4242\s+unread 4096", rows[0])
    assert re.search(r"rst_received\s+peer_reset\s+127\.0\.0\.1:51234\s+←\s+127\.0\.0\.1:8100\s+ESTABLISHED"
                     r"\s+web\s+java/5151", rows[1])
    assert re.search(r"rst_sent\s+no_listener\s+127\.0\.0\.1:9\s+→\s+127\.0\.0\.1:40000\s+-\s+web\s+-", rows[2])
    assert re.search(r"syn_dropped\s+accept_queue_full\s+127\.0\.0\.1:8100\s+↔\s+127\.0\.0\.1:52000\s+LISTEN"
                     r"\s+web\s+burst-server/4242\s+accept q 6/5 syn q 3/256", rows[6])


def test_event_rows_are_coloured_by_the_catalog_severity():
    table = ui.events_table(incident_events()).table(200)
    assert [row.style for row in table.rows] == [ui.SEVERITY_STYLE[CATALOG[e["reason"]].severity]
                                                 for e in incident_events()]
    assert table.rows[0].style == "bold red" and table.rows[1].style == "yellow"


def test_a_narrow_terminal_loses_the_least_useful_columns_not_the_addresses():
    text = draw(ui.events_table(incident_events()), width=100)
    header = text.splitlines()[0].split()
    assert header == ["time", "event", "reason", "local", "remote", "process"]
    assert re.search(r"rst_sent\s+closed_with_unread_data\s+127\.0\.0\.1:8100\s+→\s+127\.0\.0\.1:51234\s+"
                     r"nginx/4242", text)


def test_events_panel_shows_the_newest_events_that_fit():
    evs = [event(remote=("127.0.0.1", 30000 + i), t=i * 1000) for i in range(50)]
    text = draw(ui.EventsView(evs), width=160, height=10)
    ports = [int(m) for m in re.findall(r"127\.0\.0\.1:(3\d{4})", text)]
    assert ports == list(range(30043, 30050))      # 10 lines - borders - header = the 7 newest, oldest first


# -- completeness ----------------------------------------------------------------------------------

def test_losses_and_kernel_reconciliation_are_shown():
    state = loaded_state({"schema": "rsttrace/1", "type": "lost", "time": "x", "lost": 12, "total_lost": 12},
                         RECONCILIATION)
    text = draw(ui.completeness_panel(state, 2.5))
    assert "events 7 · 2.5/s · lost 12 (ring buffer full; exact counts kept in the kernel)" in text
    flat = " ".join(text.replace("│", " ").split())
    assert "netns web: coverage rst_sent 100% · listen_drops 96%" in flat
    assert ("rsttrace saw rst_sent 3, rst_received 3, syn_dropped 48; kernel counted TcpOutRsts +3, "
            "TcpEstabResets +3, ListenOverflows +50, ListenDrops +50") in flat
    assert "host" not in flat                           # a netns where nothing moved is left out
    assert "below 100% is expected" in flat             # the run filters by port
    assert "bold red" in styles_of(ui.reconciliation_lines(RECONCILIATION["netns"], True)[0], "coverage")


def test_drops_the_kernel_counted_where_no_hook_saw_them_are_said():
    web = {**RECONCILIATION["netns"][1], "counted": {"syn_dropped": 48},
           "unexplained": {"TcpExtListenOverflows": 2, "TcpExtListenDrops": 2}}
    flat = " ".join(draw(ui.Group(*ui.reconciliation_lines([web], True))).split())
    assert "counted by the kernel where no hook saw a decision: ListenOverflows 2, ListenDrops 2" in flat


def test_without_reconciliation_the_panel_says_when_counters_are_compared():
    assert "kernel counters: compared at exit" in draw(ui.completeness_panel(loaded_state(), 0.0))


# -- the whole screen and the final summary --------------------------------------------------------

@pytest.mark.parametrize("size", [(160, 45), (100, 30), (80, 24)])
def test_whole_screen_fits_common_terminal_sizes(size):
    width, height = size
    state = loaded_state(LISTENERS, RECONCILIATION)
    text = draw(ui.screen(state, "db-7", width), width=width, height=height)
    lines = text.splitlines()
    assert len(lines) == height and all(len(ln) <= width for ln in lines)
    for title in ("rsttrace", "completeness", "listeners on traced ports", "reasons, worst first", "latest events"):
        assert title in text
    assert "accept_queue_full" in text


def test_final_summary_gives_top_reasons_top_listeners_and_advice():
    state = loaded_state(LISTENERS, SUMMARY)
    text = draw(ui.final_summary(state), width=200)
    assert "rsttrace: 7 events in 14.5s, lost 0" in text
    top = text[text.index("Top reasons"):text.index("Top listeners")].splitlines()[1:]
    assert [re.search(r"[✖▲·] (\w+)", ln).group(1) for ln in top] == [
        "closed_with_unread_data", "accept_queue_full", "peer_reset", "no_listener"]
    assert re.search(r"2\s+✖ closed_with_unread_data\s+rst_sent\s+closed with unread data", top[0])
    listeners = text[text.index("Top listeners"):text.index("Advice")]
    assert ("127.0.0.1:8100 (netns web) burst-server/4242: accept queue peak 6/5, drops 48, limit 5 = listen() "
            "backlog (somaxconn 4096)") in listeners
    assert "local endpoints that reset or dropped most: 127.0.0.1:8100 (3), 127.0.0.1:9 (1)" in listeners
    advice = text[text.index("Advice"):]
    assert CATALOG["closed_with_unread_data"].fix.split(";")[0] in advice
    assert "rsttrace explain closed_with_unread_data" in advice
    assert ("127.0.0.1:8100 (netns web): the accept queue is capped by the listen() backlog (5); raise it in the "
            "server (somaxconn is 4096)") in " ".join(advice.split())
    assert "peer_reset" in advice and "no_listener" not in advice          # three reasons of advice at most
    assert "counted 7 events in the kernel, 7 were delivered, 0 lost" in text
    assert "kernel counters (rsttrace's own netns, all ports): TcpOutRsts +3" in text
    assert "netns web: coverage rst_sent 100% · listen_drops 96%" in text           # the exit reconciliation


def test_listener_peak_is_kept_after_the_queue_drains():
    drained = {**LISTENERS, "listeners": [{**LISTENERS["listeners"][1], "accept_qlen": 0, "drops_per_s": 0.0}]}
    state = loaded_state(LISTENERS, drained)
    text = draw(ui.final_summary(state), width=200)
    assert "accept queue peak 6/5, drops 48" in text


# -- the sink on a terminal ------------------------------------------------------------------------

SGR = re.compile(r"\x1b\[([0-9;]*)m")


def colour_codes(raw: str) -> list[str]:
    """SGR sequences that set a colour (foreground/background, 16/256/truecolor)."""
    out = []
    for m in SGR.finditer(raw):
        for p in (m.group(1) or "0").split(";"):
            if p.isdigit() and (30 <= int(p) <= 38 or 40 <= int(p) <= 48 or 90 <= int(p) <= 107):
                out.append(m.group(0))
                break
    return out


def run_sink(monkeypatch, no_color: bool) -> str:
    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")
    else:
        monkeypatch.delenv("NO_COLOR", raising=False)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120, height=40, color_system="256")
    sink = ui.UiSink(console=console, refresh_per_second=20, host="db-7")
    for rec in [COVERAGE, *incident_events(), LISTENERS, SUMMARY]:
        sink.emit(rec)
    sink.close()
    return buf.getvalue()


def test_screen_uses_the_alternate_screen_and_gives_the_terminal_back(monkeypatch):
    raw = run_sink(monkeypatch, no_color=False)
    assert raw.index("\x1b[?1049h") < raw.rindex("\x1b[?1049l")     # entered, then left the alternate screen
    assert raw.rindex("\x1b[?25h") > raw.index("\x1b[?25l")          # cursor hidden while drawing, shown after
    after = raw[raw.rindex("\x1b[?1049l"):]
    assert "Top reasons" in after and "Advice" in after              # the summary lands on the normal screen
    assert colour_codes(raw)                                         # the check below can fail


def test_no_color_emits_no_colour_codes(monkeypatch):
    raw = run_sink(monkeypatch, no_color=True)
    assert "Top reasons" in raw and "closed_with_unread_data" in raw
    assert colour_codes(raw) == []


def test_stderr_while_the_screen_is_up_is_kept_and_replayed_after(monkeypatch, capsys):
    monkeypatch.setenv("NO_COLOR", "1")
    console = Console(file=io.StringIO(), force_terminal=True, width=100, height=30)
    sink = ui.UiSink(console=console, host="db-7")
    sink.emit(COVERAGE)
    import sys
    print("rsttrace: netns web vanished", file=sys.stderr)
    assert "netns web vanished" in draw(ui.completeness_panel(sink.state, 0.0))
    sink.close()
    assert "rsttrace: netns web vanished" in capsys.readouterr().err


def test_an_event_storm_keeps_memory_bounded():
    state = ui.UiState(max_events=100, clock=Clock())
    state.apply(COVERAGE)
    template = incident_events()
    for i in range(30_000):
        rec = dict(template[i % len(template)])
        rec["local"] = {"addr": "10.0.0.1", "port": 1 + i % 5000}     # many distinct endpoints
        state.apply(rec)
    assert len(state.recent) == 100
    assert state.total == 30_000 and sum(state.counts.values()) == 30_000
    assert len(state.endpoints) <= ui.MAX_ENDPOINTS + 1 and "(other)" in state.endpoints
    assert len(state.counts) == 4


# -- choosing the screen, and `rsttrace explain` ---------------------------------------------------

@pytest.mark.parametrize("isatty,term,args,expected", [
    (True, "xterm-256color", {}, True),
    (True, "xterm-256color", {"fmt": "plain"}, False),
    (True, "xterm-256color", {"fmt": "json"}, False),
    (True, "xterm-256color", {"fmt": "ecs"}, False),
    (True, "xterm-256color", {"output": "/tmp/x.log"}, False),
    (False, "xterm-256color", {}, False),
    (True, "dumb", {}, False),
])
def test_the_screen_is_only_for_a_person_at_a_terminal(monkeypatch, isatty, term, args, expected):
    monkeypatch.setattr(cli.sys.stdout, "isatty", lambda: isatty, raising=False)
    monkeypatch.setenv("TERM", term)
    kw = {"fmt": None, "output": None, **args}
    assert cli.use_ui(**kw) is expected


def test_explain_carries_the_proxy_lesson_and_the_checks():
    out = CliRunner().invoke(cli.main, ["explain", "closed_with_unread_data"]).output
    assert out.startswith("closed_with_unread_data — closed with unread data  [error]")
    assert "TCP_ABORT_ON_CLOSE" in out and "TCPAbortOnClose" in out
    assert "proxy temp dir permissions" in out and "client_max_body_size" in out
    assert "ls -ld /var/cache/nginx/proxy_temp" in out


def test_explain_accept_queue_says_the_limit_is_the_smaller_of_backlog_and_somaxconn():
    out = CliRunner().invoke(cli.main, ["explain", "accept_queue_full"]).output
    assert "min(listen() backlog, net.core.somaxconn)" in out
    assert "tcp_abort_on_overflow" in out and "TcpExtListenOverflows" in out


def test_explain_lists_every_reason_once():
    out = CliRunner().invoke(cli.main, ["explain"]).output.splitlines()
    assert [ln.split()[0] for ln in out] == list(CATALOG)
