"""The pipeline's per-shape cache (tracer/pipeline.py): record → JSON line once per event *shape*,
not per event.

A storm repeats one event thousands of times a second: same kind, kernel reason, stack, process,
netns — only the connection (addresses, ports, socket, unread bytes) and the time differ. For such
events the first one of each shape goes the normal way (Pipeline.handle: decode, classify,
attribute, explain, record, JSON) and its JSON line becomes a template: the line the JSON encoder writes for
that very record with each per-event field replaced by a marker, split at the markers. The next
events of that shape fill the template straight from the raw record: no Event, no record dict, no
encoding of the constant part, the key and the whole line made in one step each. The template is
the normal path's own output, so both write the same lines (tests/unit/test_fastpath.py compares
them, record for record).

A chunk of known shapes takes one pass, each record's objects made and dropped in turn
(_known_shapes). The records it cannot take (a new shape, one the shape does not decide) are put
off to the end of the chunk, handled there together (attribution prepared once for all of them),
and their lines written in their place (scripts/bench/README.md has what it saves). One pass, not
two (a plan of the whole chunk, then the lines): with two, a chunk's worth of tuples is alive at
once, out of the CPU's caches.

Taken only when every sink takes JSON lines as they are (--json) or ignores events (--metrics),
and only for events the shape decides entirely: RSTs without listener queues whose process is the
task on the CPU, the one the kernel saw calling connect(), or — for a reset with no socket — the
listener of the local port (or nobody), and whose process had no failed syscall just before
(app_errors: the kernel marks those, and they are read for each event). An RST received whose
reverse 4-tuple this host sent an RST on a moment before is not one of those: its record names that
rst_sent (enrich/stories.py), and the RSTs sent that templates write are noted for it. The rest take
the normal path. Templates are dropped every TEMPLATE_TTL_S, so that what changes slowly (process
names, cgroups, netns names, listeners) is looked up again, as the normal path would.
"""
from __future__ import annotations

import operator
import struct
import time
from collections import Counter
from typing import Protocol


from .enrich import reasons, stories
from .enrich.stories import PAIR_WINDOW_NS
from .kernel import layout
from .enrich.attribution import Attributor
from .events.decode import AF_INET, AF_INET6, CACHE_MAX, RING_RECORD, Decoder, Event
from .sinks import jsonenc, records
from .sinks.ratelimit import RateLimit


class EventPath(Protocol):
    """What the fast path needs of the pipeline (tracer/pipeline.py) it caches for: its parts, and
    its counts, which both paths keep alike."""
    decoder: Decoder
    attributor: Attributor
    sinks: list
    limit: RateLimit | None
    count_limit: int | None
    counts: Counter
    emitted: int

    def handle(self, ev: Event) -> bool: ...
    def netns_counter(self, netns: int) -> Counter: ...
    def count_written(self, n: int) -> None: ...

TEMPLATE_TTL_S = 5.0
MAX_TEMPLATES = 4096

# Two views of a ring record (after its 8-byte header; the bytes not named are skipped: no Python
# objects made of them). The shape is the record's bytes from linger_jiffies to owner_comm
# (bpf/rsttrace.h groups them).
SHAPE = slice(8 + layout.RawEvent.linger_jiffies.offset,
              8 + layout.RawEvent.owner_comm.offset + layout.RawEvent.owner_comm.size)
_STRIDE = RING_RECORD.size
# KEY_RECORD: what FastPath.key() needs, for a record no template took.
_KEYED = ("sock_ino", "kind", "owner_tgid", "flags", "lport", "laddr", "ktime_ns", "rport", "raddr", "app_errors")
_format, _at = layout.struct_layout(layout.RawEvent, set(_KEYED))
KEY_RECORD = struct.Struct("<I4x" + _format[1:] + "x" * (_STRIDE - 8 - layout.EVENT_SIZE))
(_INO, _KIND, _OWNER, _FLAGS, _LPORT, _LADDR, _KTIME, _RPORT, _RADDR, _APP) = (_at[name] + 1 for name in _KEYED)


def _known_record() -> struct.Struct:
    """KNOWN_RECORD: what a record of a known shape needs (_known_shapes), in one item each: the
    per-event fields, and the shape as one bytes object (its template's key)."""
    raw, fmt, at = layout.RawEvent, "<I4x", 0
    for offset, code in ((raw.ktime_ns.offset, "Q"), (raw.sock_cookie.offset, "Q"), (raw.sock_ino.offset, "Q"),
                         (SHAPE.start - 8, f"{SHAPE.stop - SHAPE.start}s"), (raw.unread_bytes.offset, "I"),
                         (raw.lport.offset, "H"), (raw.rport.offset, "H"), (raw.laddr.offset, "16s"),
                         (raw.raddr.offset, "16s")):
        if offset < at:
            raise ValueError("bpf/rsttrace.h: the fast path's fields are out of order")
        fmt += "x" * (offset - at) + code
        at = offset + struct.calcsize("<" + code)
    return struct.Struct(fmt + "x" * (_STRIDE - 8 - at))


KNOWN_RECORD = _known_record()
(_K_KTIME, _K_COOKIE, _K_INO, _K_SHAPE, _K_UNREAD, _K_LPORT, _K_RPORT, _K_LADDR, _K_RADDR) = range(1, 10)
F_QUEUES, F_SOFTIRQ = layout.F_QUEUES, layout.F_SOFTIRQ
_RST_KINDS = {value for value, name in layout.KIND_NAMES.items() if name in ("rst_sent", "rst_received")}
_RST_RECEIVED = next(value for value, name in layout.KIND_NAMES.items() if name == "rst_received")

# Markers for the per-event fields, in the record and in the explanation.
_M = {name: f"@@rsttrace:{name}@@" for name in ("time", "ktime", "laddr", "lport", "raddr", "rport", "inode",
                                                "cookie", "unread", "explanation")}
_LOCAL, _REMOTE, _UNREAD_MARK = "\0L\0", "\0R\0", "\0U\0"


PER_EVENT_EXTRAS = {"reset_by", "origin", "firewall", "nat"}


def supported(sinks: list) -> bool:
    """Every sink takes ready JSON lines, or has no use for event records."""
    return bool(sinks) and all(getattr(s, "write_event_json", None) or getattr(s, "ignores_events", False)
                               for s in sinks)


class _Marked:
    """An enriched Event whose per-event parts read as markers (to cut its explanation into parts)."""
    local, remote, unread_bytes = _LOCAL, _REMOTE, _UNREAD_MARK

    def __init__(self, ev: Event):
        self._ev = ev

    def __getattr__(self, name):
        return getattr(self._ev, name)


# The per-event fields in the order records.event_record() writes them: how each is written, and
# which per-event values fill it. The time is filled in two parts (the whole second's text, made
# once a second, and the microseconds), the endpoints in the explanation as address and port: the
# template's one %-format makes the whole line, no intermediate bytes per event.
_SLOTS = (("time", b'"%s.%06dZ"', ("second", "micros")), ("ktime", b"%d", ("ktime",)),
          ("laddr", b'"%s"', ("laddr",)), ("lport", b"%d", ("lport",)), ("raddr", b'"%s"', ("raddr",)),
          ("rport", b"%d", ("rport",)), ("inode", b"%s", ("inode",)), ("cookie", b"%s", ("cookie",)),
          ("unread", b"%d", ("unread",)), ("explanation", None, ()))
# Where each per-event value sits in the tuple FastPath.process builds for an event.
_VALUE = {name: i for i, name in enumerate(("second", "micros", "ktime", "laddr", "lport", "raddr", "rport",
                                            "inode", "cookie", "unread"))}
# The explanation's per-event parts: how each is written (IPv6 endpoints in brackets, as
# decode.endpoint() writes them), and its values.
_PARTS = {_LOCAL: (b"%s:%d", b"[%s]:%d", ("laddr", "lport")), _REMOTE: (b"%s:%d", b"[%s]:%d", ("raddr", "rport")),
          _UNREAD_MARK: (b"%d", b"%d", ("unread",))}


class Template:
    """One shape's JSON line as a bytes %-format, and the per-event values it takes, in order."""
    __slots__ = ("emit", "kind", "reason", "count_key", "per_netns", "line", "values", "family", "addrs", "sender",
                 "received")

    def __init__(self, ev: Event, emit: bool, per_netns: Counter, addrs: dict[int, dict[bytes, bytes]],
                 pairs: bool = False):
        self.emit = emit                        # passes --reason and the process filters
        self.kind, self.reason = ev.kind, ev.reason
        # An RST sent that an rst_received of this host may name (enrich/stories.py): what it will say
        self.sender = stories.sender(ev) if pairs and ev.kind == "rst_sent" else None
        self.received = pairs and ev.kind == "rst_received"     # its sender looked for among those
        self.count_key = (ev.kind, ev.reason)
        self.per_netns = per_netns              # the pipeline's count of events seen in the netns
        self.family = AF_INET6 if ev.family == "ipv6" else AF_INET
        self.addrs = addrs[self.family]         # FastPath's address texts of that family
        if not emit:
            return
        rec = records.event_record(ev)
        rec["time"], rec["ktime_ns"] = _M["time"], _M["ktime"]
        rec["local"] = {"addr": _M["laddr"], "port": _M["lport"]}
        rec["remote"] = {"addr": _M["raddr"], "port": _M["rport"]}
        sock = rec["socket"] = dict(rec["socket"], inode=_M["inode"], cookie=_M["cookie"])
        if sock["unread_bytes"] is not None:    # None for minisockets: the whole shape alike
            sock["unread_bytes"] = _M["unread"]
        rec["explanation"] = _M["explanation"]
        line = jsonenc.dumps(rec).replace(b"%", b"%%")
        order: list[str] = []
        at = -1
        for name, form, values in _SLOTS:
            mark = b'"' + _M[name].encode() + b'"'
            if name == "unread" and sock["unread_bytes"] is None:
                continue
            where = line.find(mark)
            if where < at or line.count(mark) != 1:
                raise RuntimeError(f"event record field {name!r} moved: the fast path's slots follow "
                                   "records.event_record()")
            at = where
            if form is None:                    # the explanation: its own parts, JSON-escaped once
                form, values = _explanation_format(ev)
            order += values
            line = line.replace(mark, form)
        self.line = line
        self.values = operator.itemgetter(*(_VALUE[name] for name in order))


def _explanation_format(ev: Event) -> tuple[bytes, list[str]]:
    """The event's explanation as a JSON string with %-slots where the per-event parts go (local and
    remote endpoint, unread bytes: plain ASCII, nothing to escape), and the values they take, in order."""
    text = reasons.explain(_Marked(ev))     # type: ignore[arg-type]
    v6 = ev.family == "ipv6"
    form, values = b'"', []
    while True:
        found = [(text.find(m), m) for m in (_LOCAL, _REMOTE, _UNREAD_MARK) if m in text]
        if not found:
            break
        where, mark = min(found)
        v4_form, v6_form, names = _PARTS[mark]
        form += _json_inner(text[:where]).replace(b"%", b"%%") + (v6_form if v6 else v4_form)
        values += names
        text = text[where + len(mark):]
    return form + _json_inner(text).replace(b"%", b"%%") + b'"', values


def _json_inner(text: str) -> bytes:
    return jsonenc.dumps(text)[1:-1]


class FastPath:
    """Per chunk of ring records: template lines for known shapes, Pipeline.handle for the rest.

    Templates are keyed by the shape's bytes (`templates`), or for a reset with no socket by the
    shape and then the local address and port (`by_port`): its listener, or nobody. With --count or
    --max-rate every event is counted in ring order, so a record a template cannot take ends the
    pass, and the rest of the chunk goes through _classify and _in_order."""

    def __init__(self, path: EventPath):
        self.path = path
        self.decoder = path.decoder
        self.attributor = path.attributor
        self.out = [s.write_event_lines for s in path.sinks if getattr(s, "write_event_json", None)]
        self.templates: dict[bytes, Template] = {}                  # shapes that decide the template
        self.by_port: dict[bytes, dict[tuple, Template]] = {}       # resets with no socket: per local port
        self._stored = 0
        self._expires = time.monotonic() + TEMPLATE_TTL_S
        self.fast = self.slow = 0               # events each way (tests, benchmarks)
        # RST pairs (enrich/stories.py): the RSTs sent that templates write are noted there; an RST
        # received whose sender this host may have sent takes the normal path, which names it.
        self.pairs = getattr(path, "stories", None)
        self._addrs = {AF_INET: {}, AF_INET6: {}}
        self._second, self._second_text = -1, b""

    def key(self, t: tuple, shape: bytes) -> bytes | tuple | None:
        """The shape of a record (t: its KEY_RECORD fields), or None if the shape does not decide
        its enrichment."""
        flags = t[_FLAGS]
        if t[_KIND] not in _RST_KINDS or flags & F_QUEUES or t[_APP]:
            return None                         # app_errors: read from the kernel's map (enrich/app.py)
        if t[_KIND] == _RST_RECEIVED and self.pairs is not None and self._maybe_paired(
                t[_RADDR], t[_RPORT], t[_LADDR], t[_LPORT], t[_KTIME]):
            return None                         # its sender may be this host's: the normal path names it
        decided_by = self.attributor.decided_by(bool(flags & F_SOFTIRQ), t[_OWNER], t[_INO])
        if decided_by == "port_listener":
            return (shape, t[_LADDR], t[_LPORT])    # no socket: the local port's listener, or nobody
        return shape if decided_by is not None else None

    def _note_pair(self, what: Template, t: tuple) -> None:
        """What Stories.note does for a record a template writes: an RST sent noted for the RSTs
        received it may cause, an RST received (whose sender this host did not send) counted unpaired."""
        if what.sender is not None:
            self.pairs.note_sent(t[_K_LADDR], t[_K_LPORT], t[_K_RADDR], t[_K_RPORT], t[_K_KTIME], what.sender)
        elif what.received:
            self.pairs.unpaired += 1

    def _maybe_paired(self, raddr: bytes, rport: int, laddr: bytes, lport: int, ktime: int) -> bool:
        """An RST received whose reverse 4-tuple this host sent an RST on a moment before."""
        hit = self.pairs.sent.get((raddr, rport, laddr, lport))
        return hit is not None and 0 < ktime - hit[0] < PAIR_WINDOW_NS

    def _template(self, key: bytes | tuple) -> Template | None:
        if type(key) is bytes:
            return self.templates.get(key)
        ports = self.by_port.get(key[0])
        return ports.get(key[1:]) if ports is not None else None

    def _store(self, key: bytes | tuple, ev: Event, passed: bool) -> None:
        tmpl = Template(ev, passed, self.path.netns_counter(ev.netns), self._addrs, self.pairs is not None)
        if type(key) is bytes:
            self.templates[key] = tmpl
        else:
            self.by_port.setdefault(key[0], {})[key[1:]] = tmpl
        self._stored += 1

    def process(self, chunk: bytes) -> int:
        """Every record of a ring-reader chunk, in ring order; how many records the chunk held."""
        now = time.monotonic()
        if now >= self._expires or self._stored > MAX_TEMPLATES:
            self.templates.clear()
            self.by_port.clear()
            self._stored = 0
            self._expires = now + TEMPLATE_TTL_S
        self.decoder.refresh()
        p = self.path
        if p.limit is None and p.count_limit is None:
            self._known_shapes(chunk, 0, len(chunk), missed=[])
        else:       # --max-rate, --count: every event counted in ring order, so no record is put off
            done = self._known_shapes(chunk, 0, len(chunk))
            if done < len(chunk):
                rest = range(done, len(chunk), _STRIDE)
                self._in_order(chunk, self._classify(chunk, rest), [], {})
        return len(chunk) // _STRIDE

    def _known_shapes(self, chunk: bytes, start: int, stop: int, missed: list[int] | None = None) -> int:
        """Records chunk[start:stop] of shapes that have a template, in one pass: what Pipeline.handle
        does for them, from the raw records. A record that needs more is put off with `missed`
        (then taken the normal way, its line in its place) or, without, ends the pass. Returns where
        it stopped: `stop`, or the first record it left (or, for --count, where the count was reached)."""
        p = self.path
        limit, count = p.limit, p.count_limit
        checked = limit is not None or count is not None
        templates, by_port, remember = self.templates, self.by_port, self._remember
        pairs, maybe_paired = self.pairs, self._maybe_paired
        wall, size = self.decoder.mono_to_wall, layout.EVENT_SIZE
        second, second_text = self._second, self._second_text
        used: list[Template] = []
        lines: list[bytes] = []
        line_at: dict[int, int] = {}            # a missed record's offset → lines before it
        ring = KNOWN_RECORD.iter_unpack(memoryview(chunk)[start:stop])
        done = stop
        for t in ring:
            if t[0] != size:
                continue                        # discarded in the kernel
            what = templates.get(t[_K_SHAPE])
            if what is None:                    # a reset with no socket: its local port's listener
                ports = by_port.get(t[_K_SHAPE])
                what = ports.get((t[_K_LADDR], t[_K_LPORT])) if ports is not None and not t[_K_INO] else None
            if what is not None and what.received and maybe_paired(t[_K_RADDR], t[_K_RPORT], t[_K_LADDR],
                                                                    t[_K_LPORT], t[_K_KTIME]):
                what = None                     # this host may have sent it: the normal path names it
            if what is None:
                at = stop - (operator.length_hint(ring) + 1) * _STRIDE
                if missed is None:
                    done = at
                    break
                missed.append(at)
                line_at[at] = len(lines)
                continue
            if checked:
                if count is not None and p.emitted >= count:
                    break
                if what.emit and pairs is not None:     # as Stories.note, before --max-rate
                    self._note_pair(what, t)
                what.per_netns[what.kind] += 1
                self.fast += 1
                if not what.emit or limit is not None and not limit.allow(time.monotonic(), what.kind, what.reason):
                    continue
                p.counts[what.count_key] += 1
                p.count_written(1)
            else:
                used.append(what)               # counted per template below
                if not what.emit:
                    continue
                if pairs is not None:
                    self._note_pair(what, t)
            addrs, la, ra = what.addrs, t[_K_LADDR], t[_K_RADDR]
            laddr = addrs.get(la) or remember(la, what.family)
            raddr = addrs.get(ra) or remember(ra, what.family)
            ktime, ino, cookie = t[_K_KTIME], t[_K_INO], t[_K_COOKIE]
            secs, ns = divmod(ktime + wall, 1_000_000_000)
            if secs != second:                  # records.rfc3339()'s whole seconds, made once a second
                second, second_text = secs, records.rfc3339(secs * 1_000_000_000)[:-8].encode()
            lines.append(what.line % what.values((
                second_text, ns // 1000, ktime, laddr, t[_K_LPORT], raddr, t[_K_RPORT],
                b"%d" % ino if ino else b"null", b"%d" % cookie if cookie else b"null", t[_K_UNREAD])))
        self._second, self._second_text = second, second_text
        if used:
            self.fast += len(used)
            counts = p.counts
            for tmpl, n in Counter(used).items():
                tmpl.per_netns[tmpl.kind] += n
                if tmpl.emit:
                    counts[tmpl.count_key] += n
            p.count_written(len(lines))
        if missed:
            self._in_order(chunk, self._classify(chunk, missed), lines, line_at)
        elif lines:
            self._write(lines)
        return done

    def _classify(self, chunk: bytes, offsets) -> list[tuple[int, bytes | tuple | None, Event | None]]:
        """The records at these offsets, each with its shape and, where it needs the normal path,
        its Event (the first of a new shape, a record the shape does not decide); attribution is
        prepared once for all of those. The others have a template, or will once the first of their
        shape has been through Pipeline.handle."""
        decoder, size = self.decoder, layout.EVENT_SIZE
        shape_from, shape_to = SHAPE.start, SHAPE.stop
        out: list[tuple[int, bytes | tuple | None, Event | None]] = []
        first: set = set()
        for at in offsets:
            t = KEY_RECORD.unpack_from(chunk, at)
            if t[0] != size:
                continue                        # discarded in the kernel
            key = self.key(t, chunk[at + shape_from:at + shape_to])
            if key is not None and (key in first or self._template(key) is not None):
                out.append((at, key, None))
                continue
            if key is not None:
                first.add(key)
            out.append((at, key, decoder.event(RING_RECORD.unpack_from(chunk, at))))
        self.attributor.prepare([ev for _, _, ev in out if ev is not None])
        return out

    def _in_order(self, chunk: bytes, classified: list, lines: list[bytes], line_at: dict[int, int]) -> None:
        """Classified records in ring order, with the lines already made for the records around them
        (lines[:line_at[offset]] come before the record at that offset): Pipeline.handle for those
        with an Event, their template for the rest (runs of neighbours in one _known_shapes call)."""
        p = self.path
        count = p.count_limit
        written = 0
        run_from = run_to = -1
        end = len(chunk)
        for at, key, ev in classified + [(end, None, None)]:    # a last entry ends the last run
            if ev is None and at == run_to and at < end:
                run_to += _STRIDE
                continue
            while run_from < run_to:            # their shape has a template now
                run_from = self._known_shapes(chunk, run_from, run_to)
                if run_from < run_to:           # not expected: the normal way, on its own
                    self._in_order(chunk, self._classify(chunk, [run_from]), [], {})
                    run_from += _STRIDE
            if at == end:
                break
            before = line_at.get(at, written)
            if before > written:
                self._write(lines[written:before])
                written = before
            if ev is None:
                run_from, run_to = at, at + _STRIDE
                continue
            if count is not None and p.emitted >= count:
                break
            self.slow += 1
            passed = p.handle(ev)
            # An RST received that named its sender (enrich/stories.py), or what a reset's origin
            # showed (enrich/origins.py), is that connection's alone
            if key is not None and self._template(key) is None and not any(ev.extra.get(k) is not None for k in PER_EVENT_EXTRAS):
                self._store(key, ev, passed)
        if written < len(lines):
            self._write(lines[written:])

    def _remember(self, raw: bytes, family: int) -> bytes:
        """An address's text, kept for the next records (the raw IPv4 field has 12 bytes of zeros
        after the address). The dicts are cleared, never replaced: templates hold them."""
        if sum(map(len, self._addrs.values())) > CACHE_MAX:
            for addrs in self._addrs.values():
                addrs.clear()
        text = self.decoder.text_addr(raw[:4] if family == AF_INET else raw, family).encode()
        self._addrs[family][raw] = text
        return text

    def _write(self, lines: list[bytes]) -> None:
        for write_lines in self.out:
            write_lines(lines)
