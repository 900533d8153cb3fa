"""Terminal UI: a live rich screen of what rsttrace sees, then a final summary when it stops.

A view of the same records every other sink gets (records.py); it never touches BPF. The words come
from the one reason catalog (enrich/reasons.py): severity, one-line explanation, fix.

Bounded under a storm: a record only bumps counters and appends to a fixed-size deque (O(1), no
drawing); rich's refresh thread rebuilds the screen at most REFRESH_HZ times a second, whatever the
event rate. The screen is the terminal's alternate screen, so stopping (Ctrl-C, --count, --duration,
an error) always gives the user's terminal back as it was, with the final summary printed below.
"""
from __future__ import annotations

import io
import socket
import sys
import threading
import time
from collections import Counter, deque
from typing import Any, Callable, Iterable

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.layout import Layout
from rich.live import Live
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .. import __version__
from ..enrich.reasons import CATALOG
from ..events.decode import endpoint
from .records import one_line
from .summary import listener_connections

REFRESH_HZ = 4              # screen redraws per second, at most
MAX_EVENTS = 200            # latest events kept for the screen (more than any terminal shows)
MAX_ENDPOINTS = 1024        # distinct local endpoints counted for the summary; the rest go to "other"
RATE_WINDOW_S = 10.0        # per-reason rates are averaged over this window
MAX_NOTES = 20              # stderr lines kept while the screen owns the terminal
CONNECTION_ROWS = 6         # connections' stories shown under the events

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
# A glyph as well as a colour, so severity still reads with NO_COLOR and in a text capture.
SEVERITY_MARK = {"error": "✖", "warning": "▲", "info": "·"}
SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}
ARROW = {"rst_sent": "→", "rst_received": "←", "connection": "→"}  # RST direction, client → server; drops "↔"


def _reason(name: str):
    return CATALOG.get(name, CATALOG["unknown"])


def _ep(ep: dict | None) -> str:
    return endpoint(ep["addr"], ep["port"]) if ep else "?"


def _proc(p: dict | None) -> str:
    return f"{p.get('comm') or '?'}/{p['pid']}" if p and p.get("pid") else "-"


def _netns(ns: dict | None) -> str:
    if not ns:
        return "?"
    return ns.get("name") or str(ns.get("inode", "?"))


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class UiState:
    """Everything the screen shows, aggregated from records: O(1) per record, bounded memory."""

    def __init__(self, max_events: int = MAX_EVENTS, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started: float | None = None
        self.coverage: dict | None = None
        self.counts: Counter[tuple[str, str]] = Counter()      # (event kind, reason) -> events
        self.total = 0
        self.recent: deque[dict] = deque(maxlen=max_events)
        self.connections: deque[dict] = deque(maxlen=CONNECTION_ROWS)   # the latest connections' stories
        self.endpoints: Counter[str] = Counter()                # local endpoint -> events (capped)
        self.lost = 0
        self.listeners: dict | None = None                      # the latest "listeners" record
        self.listener_peaks: dict[tuple, dict] = {}             # per listener, over the whole run
        self.reconciliation: dict | None = None                 # the latest "reconciliation" record
        self.summary: dict | None = None
        self.notes: deque[str] = deque(maxlen=MAX_NOTES)
        self._snapshots: deque[tuple[float, Counter]] = deque()  # (time, counts) for rates

    def apply(self, rec: dict) -> None:
        if self.started is None:
            self.started = self.clock()
            self._snapshots.append((self.started, Counter()))
        kind = rec.get("type")
        if kind == "event":
            self.counts[(rec["event"], rec["reason"])] += 1
            self.total += 1
            self.recent.append(rec)
            if rec["event"] != "rst_received":     # the side that reset or dropped
                key = _ep(rec.get("local"))
                if key in self.endpoints or len(self.endpoints) < MAX_ENDPOINTS:
                    self.endpoints[key] += 1
                else:
                    self.endpoints["(other)"] += 1
        elif kind == "connection":
            # A connection's story, in a panel of its own: client → server, how it ended, what hurt it.
            # In the event log a burst's stories would push out the drops that explain them.
            self.counts[("connection", rec["outcome"])] += 1
            self.connections.append(connection_row(rec))
        elif kind == "coverage":
            self.coverage = rec
        elif kind == "suppressed":
            # --max-rate held these records back: they still count in the reasons and rates.
            for event, by_reason in rec["by_reason"].items():
                for reason, n in by_reason.items():
                    self.counts[(event, reason)] += n
                    self.total += n
        elif kind == "aggregate":
            # Counted in the kernel during a storm, not written one by one: still in the reasons and rates.
            self.counts[(rec["event"], rec["reason"])] += rec["count"]
            self.total += rec["count"]
        elif kind == "storm":
            self.notes.append(one_line(rec))
        elif kind == "lost":
            self.lost = rec.get("total_lost", self.lost + rec.get("lost", 0))
        elif kind == "listeners":
            self.listeners = rec
            for li in rec.get("listeners") or []:
                self._track_listener(li)
        elif kind == "reconciliation":
            self.reconciliation = rec
        elif kind == "summary":
            self.summary = rec
            self.lost = max(self.lost, rec.get("lost", 0))

    def _track_listener(self, li: dict) -> None:
        key = ((li.get("netns") or {}).get("inode"), li["local"]["addr"], li["local"]["port"])
        peak = self.listener_peaks.get(key)
        if peak is None:
            if len(self.listener_peaks) >= MAX_ENDPOINTS:
                return
            peak = self.listener_peaks[key] = {"peak_qlen": 0}
        peak.update({k: v for k, v in li.items() if k != "accept_qlen"})
        peak["peak_qlen"] = max(peak["peak_qlen"], li.get("accept_qlen") or 0)

    def uptime(self) -> float:
        return self.clock() - self.started if self.started is not None else 0.0

    def rates(self) -> tuple[dict[tuple[str, str], float], float]:
        """Events per second per (kind, reason), and in all, over the last RATE_WINDOW_S.
        Called at redraw time only: keeps one snapshot a second, about RATE_WINDOW_S of them."""
        now = self.clock()
        if self.started is None:
            return {}, 0.0
        if now - self._snapshots[-1][0] >= 1.0:
            self._snapshots.append((now, Counter(self.counts)))
        while len(self._snapshots) > 1 and now - self._snapshots[1][0] >= RATE_WINDOW_S:
            self._snapshots.popleft()
        t0, old = self._snapshots[0]
        span = max(now - t0, 1.0)
        per = {k: (n - old.get(k, 0)) / span for k, n in self.counts.items()}
        return per, (self.total - sum(old.values())) / span

    def ordered_reasons(self) -> list[tuple[tuple[str, str], int]]:
        return worst_first(self.counts)


def worst_first(counts: dict[tuple[str, str], int]) -> list[tuple[tuple[str, str], int]]:
    """(kind, reason) counts ordered by the catalog's severity, then by count."""
    return sorted(counts.items(), key=lambda kv: (SEVERITY_RANK.get(_reason(kv[0][1]).severity, 3), -kv[1], kv[0]))


# -- panels -----------------------------------------------------------------------------------

def _table(*columns: str, **kw) -> Table:
    t = Table(box=None, show_edge=False, pad_edge=False, header_style="bold", expand=True, **kw)
    for c in columns:
        t.add_column(c, no_wrap=True, overflow="ellipsis")
    return t


class FitTable:
    """A borderless table for a width it learns at drawing time: when the columns do not all fit, it
    leaves out the least useful ones (`drop`, in order), then narrows the `squeeze` columns (down to
    their given minimum), so that addresses and ports are never the ones cut to an ellipsis."""

    def __init__(self, columns: list[str], rows: list[list], drop: Iterable[str] = (),
                 squeeze: dict[str, int] | None = None, row_styles: list[str] | None = None):
        self.columns, self.rows, self.drop, self.squeeze = columns, rows, tuple(drop), squeeze or {}
        self.row_styles = row_styles or [""] * len(rows)

    def layout(self, width: int) -> dict[str, int]:
        """Columns kept, with the width each gets."""
        need = {c: max([cell_len(c)] + [cell_len(_plain(r[i])) for r in self.rows]) for i, c in enumerate(self.columns)}

        def total(cols):
            return sum(need[c] for c in cols) + 2 * (len(cols) - 1)      # two spaces between columns
        keep = list(self.columns)
        for name in self.drop:
            if total(keep) <= width:
                break
            keep.remove(name)
        for name, least in self.squeeze.items():
            excess = total(keep) - width
            if excess <= 0:
                break
            if name in keep:
                need[name] = max(least, need[name] - excess)
        return {c: need[c] for c in keep}

    def table(self, width: int) -> Table:
        widths = self.layout(width)
        t = _table(*widths)
        for column, w in zip(t.columns, widths.values()):
            column.max_width = w
        idx = [self.columns.index(c) for c in widths]
        for row, style in zip(self.rows, self.row_styles):
            t.add_row(*(row[i] for i in idx), style=style)
        return t

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.table(options.max_width)


def _plain(cell: Any) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


HEADER_MAX_LINES = 8        # the header wraps its long lines, up to this many rows of text


def header_panel(state: UiState, host: str) -> Panel:
    cov = state.coverage or {}
    lines = [Text.assemble(("rsttrace ", "bold"), f"{__version__} on ", (host, "bold"),
                           f" · kernel {cov.get('kernel', '?')} · up {_duration(state.uptime())}",
                           f" · attached in {cov.get('startup_ms', 0):.0f} ms" if cov else "")]
    f = cov.get("filters") or {}
    lines.append(Text(
        "filters: ports " + (",".join(map(str, f.get("ports") or [])) or "all")
        + f" · pid {f.get('pid') or 'any'} · {f.get('family') or 'ipv4+ipv6'}"
        + " · reasons " + (",".join(f.get("reasons") or []) or "all")))
    used: dict[str, list[str]] = {}          # hook -> event kinds it reports
    blind: dict[str, list[str]] = {}         # why not -> event kinds not visible
    for kind, v in (cov.get("hooks") or {}).items():
        if v.get("hook"):
            inferred = " (inferred)" if (v.get("note") or "").startswith("inferred") else ""
            used.setdefault(v["hook"] + inferred, []).append(kind)
        else:
            blind.setdefault(v.get("note") or "not available", []).append(kind)
    lines.append(Text("hooks: " + (" · ".join(f"{'+'.join(kinds)} {hook}" for hook, kinds in used.items())
                                   or "none")))
    for note, kinds in blind.items():
        lines.append(Text(f"cannot see: {', '.join(kinds)} ({note})", style="yellow"))
    for spot in cov.get("blind_spots") or []:
        lines.append(Text(f"blind spot: {spot}", style="yellow"))
    return Panel(Group(*lines), title="rsttrace", title_align="left", box=box.ROUNDED)


def reconciliation_lines(per_netns: list[dict], port_filtered: bool) -> list[Any]:
    """rsttrace's counts beside the kernel's, for each netns where anything moved."""
    lines = []
    active = [ns for ns in per_netns if any((ns.get("rsttrace") or {}).values())
              or any((ns.get("kernel") or {}).values())]
    for ns in active:
        pct = ns.get("coverage_pct")
        pct = pct if isinstance(pct, dict) else {"events": pct}
        known = {k: v for k, v in pct.items() if v is not None}
        style = "dim" if not known else "green" if all(v >= 99.5 for v in known.values()) else "bold red"
        lines.append(Text.assemble(f"netns {_netns(ns)}: ", (
            "coverage " + (" · ".join(f"{k} {v:.0f}%" for k, v in known.items()) or "nothing to compare"), style)))
        ours = ", ".join(f"{k} {v}" for k, v in (ns.get("counted") or ns.get("rsttrace") or {}).items() if v)
        theirs = ", ".join(f"{k.replace('TcpExt', '')} +{v}" for k, v in (ns.get("kernel") or {}).items() if v)
        lines.append(Padding.indent(Text(f"rsttrace saw {ours or 'nothing'}; kernel counted {theirs or 'nothing'}"), 2))
        unseen = ", ".join(f"{k.replace('TcpExt', '')} {v}" for k, v in (ns.get("unexplained") or {}).items() if v)
        if unseen:
            lines.append(Padding.indent(Text(f"counted by the kernel where no hook saw a decision: {unseen}",
                                             style="yellow"), 2))
    if active and port_filtered:
        lines.append(Text("kernel counters cover every port: with --port, below 100% is expected", style="dim"))
    return lines


def completeness_panel(state: UiState, total_rate: float) -> Panel:
    """Losses and what the kernel counted beside what rsttrace reported."""
    lost_style = "bold red" if state.lost else "green"
    lines = [Text.assemble(f"events {state.total} · {total_rate:.1f}/s · ",
                           (f"lost {state.lost}", lost_style),
                           (" (ring buffer full; exact counts kept in the kernel)" if state.lost else ""))]
    rec = state.reconciliation
    ported = bool(((state.coverage or {}).get("filters") or {}).get("ports"))
    rec_lines = reconciliation_lines(rec.get("netns") or [], ported) if rec else []
    if not rec:
        lines.append(Text("kernel counters: compared at exit (summary)", style="dim"))
    elif not rec_lines:
        lines.append(Text("kernel counters: nothing moved in any netns", style="dim"))
    lines.extend(rec_lines)
    for note in list(state.notes)[-3:]:
        lines.append(Text(note, style="yellow"))
    return Panel(Group(*lines), title="completeness", title_align="left", box=box.ROUNDED)


def _height(renderable: Any, width: int) -> int:
    """Rows `renderable` takes at `width` (measured by rendering it off-screen)."""
    return len(Console(width=width, file=io.StringIO(), color_system=None).render_lines(renderable, pad=False))


def gauge(qlen: int | None, qmax: int | None, width: int = 16) -> Text:
    """Accept queue length against its limit. The kernel calls a queue full when length > limit."""
    if qlen is None or qmax is None:
        return Text("-")
    frac = 1.0 if qmax <= 0 and qlen > 0 else (min(qlen / qmax, 1.0) if qmax > 0 else 0.0)
    filled = round(frac * width)
    full = qlen > qmax
    style = "bold red" if full else "yellow" if qmax and qlen >= 0.8 * qmax else "green"
    bar = Text("█" * filled, style=style)
    bar.append("░" * (width - filled), style="dim")
    bar.append(f" {qlen}/{qmax}", style=style)
    if full:
        bar.append(" FULL", style="bold red")
    return bar


def _limit(li: dict, short: bool = False) -> str:
    """Which limit sets the accept queue's size: min(listen() backlog, net.core.somaxconn)."""
    which = li.get("binding_limit")
    qmax = li.get("accept_qmax")
    if which == "listen_backlog":
        return f"{qmax} = {'backlog' if short else 'listen() backlog'} (somaxconn {li.get('somaxconn', '?')})"
    if which == "somaxconn":
        return f"{qmax} = somaxconn (backlog {li.get('backlog', '?')})"
    return "-" if qmax is None else str(qmax)


def _hurt(c: dict | None) -> Text:
    """A listener's connections hurt (enrich/stories.py): never established / established late (p50
    delay) / reset or client only."""
    if not c:
        return Text("-", style="dim")
    late = f"{c['established_late']}"
    if c.get("added_delay_s"):
        late += f" (+{c['added_delay_s']['p50']:.1f}s)"
    bad = c["never_established"] + c["reset"] + c["client_only"]
    return Text(f"{c['never_established']}/{late}/{c['reset'] + c['client_only']}", style="bold red" if bad else "")


def listeners_panel(state: UiState, max_rows: int = 6) -> Panel:
    rec = state.listeners
    rows = list((rec or {}).get("listeners") or [])
    if not rows:
        body: Any = Text("no listener data", style="dim")
    else:
        rows.sort(key=lambda li: (-(li.get("drops_per_s") or 0), -(li.get("accept_qlen") or 0)))
        cells = []
        for li in rows[:max_rows]:
            syn = "-" if li.get("syn_qlen") is None else f"{li['syn_qlen']}/{li.get('syn_qmax', '?')}"
            dps = li.get("drops_per_s") or 0.0
            cells.append([_ep(li.get("local")), _netns(li.get("netns")), _proc(li.get("process")),
                          gauge(li.get("accept_qlen"), li.get("accept_qmax")), _limit(li, short=True), syn,
                          str(li.get("drops", 0)), Text(f"{dps:.1f}", style="bold red" if dps else ""),
                          _hurt(li.get("connections"))])
        body = FitTable(["listener", "netns", "process", "accept queue", "limit", "SYN queue", "drops", "drops/s",
                         "hurt: never/late/reset"],
                        cells, drop=("hurt: never/late/reset", "netns", "drops", "SYN queue", "process"),
                        squeeze={"limit": 12})
        if len(rows) > max_rows:
            body = Group(body, Text(f"… {len(rows) - max_rows} more", style="dim"))
    return Panel(body, title="listeners on traced ports", title_align="left", box=box.ROUNDED)


def reasons_panel(state: UiState, rates: dict, max_rows: int = 8) -> Panel:
    ordered = state.ordered_reasons()
    if not ordered:
        body: Any = Text("no resets or drops yet", style="dim")
    else:
        body = _table("", "reason", "event", "count", "/s", "what it means — what to check")
        body.columns[2].min_width = 12
        body.columns[3].justify = body.columns[4].justify = "right"
        body.columns[5].ratio = 1
        for (kind, name), n in ordered[:max_rows]:
            r = _reason(name)
            style = SEVERITY_STYLE.get(r.severity, "")
            body.add_row(Text(SEVERITY_MARK.get(r.severity, " "), style=style), Text(name, style=style), kind,
                         str(n), f"{rates.get((kind, name), 0.0):.1f}", r.one_line())
        if len(ordered) > max_rows:
            body = Group(body, Text(f"… {len(ordered) - max_rows} more reasons", style="dim"))
    return Panel(body, title="reasons, worst first", title_align="left", box=box.ROUNDED)


class EventsView:
    """The latest events, as many as the space rich gives this panel shows (newest at the bottom)."""

    def __init__(self, events: list[dict], title: str = "latest events (UTC, newest last)"):
        self.events = events
        self.title = title

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = options.height or console.height
        rows = max(height - 3, 1)          # panel border 2 + table header 1
        yield Panel(events_table(self.events[-rows:]), title=self.title, title_align="left",
                    box=box.ROUNDED, height=options.height)


def connection_row(rec: dict) -> dict:
    """A `connection` record as a row of the event log."""
    drops, retrans = rec["drops"], rec["retransmits"]
    detail = [f"{n} {what}" for n, what in ((drops["syn"], "SYN drops"), (drops["ack"], "ACK drops"),
                                          (retrans["syn"], "SYN retx"), (rec["resets_sent"], "RSTs")) if n]
    detail.append(rec["errno"] or ("gave up" if rec["abandoned"] else ""))
    detail.append(f"{rec['duration_s']:.2f}s")
    return {"time": rec["time"], "event": "connection", "reason": rec["outcome"], "local": rec["client"],
            "remote": rec["server"], "state": None, "netns": rec["server"]["netns"] or rec["client"]["netns"],
            "process": rec["client"]["process"], "detail": " ".join(d for d in detail if d)}


def events_table(events: Iterable[dict]) -> Any:
    events = list(events)
    if not events:
        return Text("waiting for events…", style="dim")
    rows, styles = [], []
    for rec in events:
        detail = []
        sock = rec.get("socket") or {}
        if sock.get("unread_bytes"):
            detail.append(Text(f"unread {sock['unread_bytes']}"))
        q = rec.get("queues") or {}
        if q.get("accept_qlen") is not None:
            full = q.get("accept_qmax") is not None and q["accept_qlen"] > q["accept_qmax"]
            detail.append(Text(f"accept q {q['accept_qlen']}/{q.get('accept_qmax', '?')}",
                               style="bold red" if full else ""))
        if q.get("syn_qlen") is not None:
            detail.append(Text(f"syn q {q['syn_qlen']}/{q.get('syn_qmax', '?')}"))
        if rec.get("detail"):
            detail.append(Text(rec["detail"]))
        rows.append([rec.get("time", "")[11:23], rec.get("event", "?"), rec.get("reason", "?"),
                     _ep(rec.get("local")), ARROW.get(rec.get("event"), "↔"), _ep(rec.get("remote")),
                     rec.get("state") or "-", _netns(rec.get("netns")), _proc(rec.get("process")),
                     Text(" ").join(detail)])
        styles.append(SEVERITY_STYLE.get(_reason(rec.get("reason", "unknown")).severity, ""))
    return FitTable(["time", "event", "reason", "local", "", "remote", "state", "netns", "process", "detail"],
                    rows, drop=("netns", "state", "detail"),
                    squeeze={"process": 10, "reason": 12, "event": 8, "time": 8}, row_styles=styles)


def screen(state: UiState, host: str, width: int) -> Layout:
    rates, total_rate = state.rates()
    head = header_panel(state, host)
    comp = completeness_panel(state, total_rate)
    # The completeness panel needs room only once there are reconciliation lines to show.
    head_w = width * 3 // 5 if len(comp.renderable.renderables) > 2 else width * 2 // 3
    top_h = min(max(_height(head, head_w), _height(comp, width - head_w)), HEADER_MAX_LINES + 2)
    head.height = comp.height = top_h
    top = Table.grid(expand=True)
    top.add_column(width=head_w)
    top.add_column(width=width - head_w)
    top.add_row(head, comp)
    n_listeners = len((state.listeners or {}).get("listeners") or [])
    n_reasons = len(state.counts)
    rows = [
        Layout(top, size=top_h),
        Layout(listeners_panel(state), size=min(n_listeners, 6) + 3 + (n_listeners > 6) if n_listeners else 3),
        Layout(reasons_panel(state, rates), size=min(n_reasons, 8) + 3 + (n_reasons > 8) if n_reasons else 3),
        Layout(EventsView(list(state.recent)), ratio=1, minimum_size=4),
    ]
    if state.connections:
        rows.append(Layout(EventsView(list(state.connections), "connections hurt: how they ended (UTC, newest last)"),
                           size=len(state.connections) + 3))
    layout = Layout()
    layout.split_column(*rows)
    return layout


def final_summary(state: UiState, top: int = 5) -> Group:
    """Printed once the screen is gone: top reasons, top listeners, what to do, and completeness."""
    out: list[Any] = []
    s = state.summary or {}
    by_reason: Counter[tuple[str, str]] = Counter()
    if s.get("events") is not None:          # the session's own count, when it got to emit it
        for kind, reasons in s["events"].items():
            for name, n in reasons.items():
                by_reason[(kind, name)] += n
    else:
        by_reason = state.counts
    total = sum(by_reason.values())
    duration = s.get("duration_s", state.uptime())
    out.append(Text.assemble(("rsttrace: ", "bold"), f"{total} events in {duration:.1f}s, ",
                             (f"lost {state.lost}", "bold red" if state.lost else "")))
    ordered = worst_first(by_reason)
    if ordered:
        out.append(Text("Top reasons", style="bold"))
        grid = _grid(4, numeric=True)
        for (kind, name), n in ordered[:top]:
            r = _reason(name)
            style = SEVERITY_STYLE.get(r.severity, "")
            grid.add_row(str(n), Text(f"{SEVERITY_MARK.get(r.severity, ' ')} {name}", style=style), kind, r.title)
        out.append(Padding.indent(grid, 2))
    out.append(Text("Top listeners", style="bold"))
    peaks = sorted(state.listener_peaks.values(), key=lambda p: (-(p.get("drops") or 0), -p["peak_qlen"]))
    for p in peaks[:top]:
        full = p.get("accept_qmax") is not None and p["peak_qlen"] > p["accept_qmax"]
        out.append(Padding.indent(Text.assemble(
            f"{_ep(p.get('local'))} (netns {_netns(p.get('netns'))}) {_proc(p.get('process'))}: accept queue peak ",
            (f"{p['peak_qlen']}/{p.get('accept_qmax', '?')}", "bold red" if full else ""),
            f", drops {p.get('drops', 0)}, limit {_limit(p)}"), 2))
    if not peaks:
        out.append(Text("  no listener data", style="dim"))
    hurt = [c for c in (s.get("connections") or {}).get("per_listener") or []]
    if hurt:
        out.append(Text("Connections", style="bold"))
        for c in hurt[:top]:
            out.append(Padding.indent(Text(listener_connections(c)), 2))
    if state.endpoints:
        out.append(Padding.indent(Text("local endpoints that reset or dropped most: " + ", ".join(
            f"{k} ({n})" for k, n in state.endpoints.most_common(top))), 2))
    advice = _advice(ordered, peaks)
    if advice:
        out.append(Text("Advice", style="bold"))
        grid = _grid(2)
        for line in advice:
            grid.add_row("•", line)
        out.append(Padding.indent(grid, 2))
    if s:
        kc = s.get("kernel_counters") or {}
        moved = {k: v for k, v in (kc.get("delta") or {}).items() if v}
        exact = sum(n for reasons in (s.get("exact_counts") or {}).values() for n in reasons.values())
        out.append(Text("Completeness", style="bold"))
        out.append(Padding.indent(Text(f"rsttrace's programs counted {exact} events in the kernel, "
                                       f"{s.get('delivered', 0)} were delivered, {state.lost} lost"), 2))
        out.append(Padding.indent(Text(f"kernel counters ({kc.get('netns', '?')} netns, all ports): " + (
            ", ".join(f"{k} +{v}" for k, v in moved.items()) or "no change")), 2))
    per_netns = s.get("reconciliation") or (state.reconciliation or {}).get("netns") or []
    ported = bool(((state.coverage or {}).get("filters") or {}).get("ports"))
    out.extend(Padding.indent(line, 2) for line in reconciliation_lines(per_netns, ported))
    return Group(*out)


def _grid(columns: int, numeric: bool = False) -> Table:
    """Aligned, borderless rows; the last column wraps, under itself, when the line is too long."""
    grid = Table.grid(padding=(0, 2))
    if numeric:
        grid.add_column(justify="right", min_width=6)
    else:
        grid.add_column(no_wrap=True)
    for _ in range(columns - 2):
        grid.add_column(no_wrap=True)
    grid.add_column()
    return grid


def _advice(ordered, peaks) -> list[str]:
    lines, seen = [], set()
    for (_kind, name), _n in ordered:
        r = _reason(name)
        if name in seen or r.severity == "info":
            continue
        seen.add(name)
        lines.append(f"{name}: {r.fix} (rsttrace explain {name})")
        if len(lines) == 3:
            break
    for p in peaks:
        if not (p.get("drops") or p["peak_qlen"] > (p.get("accept_qmax") or 0)):
            continue
        where = f"{_ep(p.get('local'))} (netns {_netns(p.get('netns'))})"
        if p.get("binding_limit") == "listen_backlog":
            lines.append(f"{where}: the accept queue is capped by the listen() backlog ({p.get('backlog')}); "
                         f"raise it in the server (somaxconn is {p.get('somaxconn')}), or accept faster")
        elif p.get("binding_limit") == "somaxconn":
            lines.append(f"{where}: the accept queue is capped by net.core.somaxconn ({p.get('somaxconn')}) in "
                         f"that netns; raise it (the server asks for {p.get('backlog')}), or accept faster")
    return lines


# -- the sink ---------------------------------------------------------------------------------

class _NoteCatcher(io.TextIOBase):
    """While the screen owns the terminal, stderr lines are kept (shown in the UI, replayed after)
    instead of being written over the screen."""

    def __init__(self, notes: deque, lock: threading.RLock):
        self.notes, self.lock, self.buf = notes, lock, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        with self.lock:
            self.notes.extend(line for line in lines if line.strip())
        return len(s)


class UiSink:
    def __init__(self, console: Console | None = None, refresh_per_second: float = REFRESH_HZ,
                 max_events: int = MAX_EVENTS, host: str | None = None, clock: Callable[[], float] = time.monotonic):
        self.console = console or Console()      # honours NO_COLOR (and TERM, COLUMNS, LINES)
        self.state = UiState(max_events, clock)
        self.host = host or socket.gethostname()
        self.refresh_per_second = refresh_per_second
        # Reentrant: a line written to stderr (the note catcher takes this lock) while the lock is held
        # must not deadlock the thread that holds it.
        self._lock = threading.RLock()
        self._live: Live | None = None
        self._stderr = None

    def emit(self, record: dict) -> None:
        with self._lock:
            self.state.apply(record)
        if self._live is None and self._stderr is None and record.get("type") != "summary":
            self._start()

    def _start(self) -> None:
        self._stderr = sys.stderr
        sys.stderr = _NoteCatcher(self.state.notes, self._lock)
        self._live = Live(get_renderable=self._render, console=self.console, screen=True, auto_refresh=True,
                          refresh_per_second=self.refresh_per_second, redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def _render(self):
        with self._lock:
            try:
                return screen(self.state, self.host, self.console.size.width)
            except Exception as err:     # a drawing bug must not kill the refresh thread mid-screen
                return Panel(Text(f"rsttrace could not draw the screen: {err!r}", style="bold red"))

    def close(self) -> None:
        try:
            if self._live is not None:
                self._live.stop()        # leaves the alternate screen, shows the cursor again
        finally:
            self._live = None
            if self._stderr is not None:
                sys.stderr, self._stderr = self._stderr, None
                for note in self.state.notes:      # what was said while the screen was up
                    print(note, file=sys.stderr)
            with self._lock:
                summary = final_summary(self.state)
            self.console.print(summary)
