"""The fast path for repeated events: record → JSON line once per event *shape*, not per event.

A storm repeats one event thousands of times a second: same kind, kernel reason, stack, process,
netns — only the connection (addresses, ports, socket, unread bytes) and the time differ. For such
events the first one of each shape goes the normal way (Session.handle: decode, classify,
attribute, explain, record, JSON) and its JSON line becomes a template: the line orjson writes for
that very record with each per-event field replaced by a marker, split at the markers. The next
events of that shape fill the template straight from the raw record: no Event, no record dict, no
encoding of the constant part (measured on a real storm: ~16 → ~3 µs of Python per event, the key
and the whole line made in one step each). The template is the normal path's own output, so both
write the same lines (tests/unit/test_fastpath.py compares them on a real storm's records).

Taken only when every sink takes JSON lines as they are (--json) or ignores events (--metrics),
and only for events the shape decides entirely: RSTs without listener queues whose process is the
task on the CPU, the one the kernel saw calling connect(), or — for a reset with no socket — the
listener of the local port (or nobody). The rest take the normal path. Templates are dropped every
TEMPLATE_TTL_S, so that what changes slowly (process names, cgroups, netns names, listeners) is
looked up again, as the normal path would.
"""
from __future__ import annotations

import operator
import struct
import time
from collections import Counter
from typing import TYPE_CHECKING

import orjson

from .enrich import reasons
from .events import record
from .events.decode import AF_INET, AF_INET6, CACHE_MAX, RING_RECORD, Event
from .sinks import records

if TYPE_CHECKING:
    from .session import Session

TEMPLATE_TTL_S = 5.0
MAX_TEMPLATES = 4096

# The fields the fast path reads from each record (the rest are skipped bytes: no Python objects made
# of them), after the ring's 8-byte header; the shape is the record's bytes from linger_jiffies to
# owner_comm (bpf/rsttrace.h groups them), sliced straight out of the chunk.
_READ = ("ktime_ns", "sock_ino", "sock_cookie", "kind", "owner_tgid", "family", "flags", "unread_bytes", "lport",
         "rport", "laddr", "raddr")
_format, _at = record.struct_layout(record.RawEvent, set(_READ))
_STRIDE = RING_RECORD.size
FAST_RECORD = struct.Struct("<I4x" + _format[1:] + "x" * (_STRIDE - 8 - record.EVENT_SIZE))
(_KTIME, _INO, _COOKIE, _KIND, _OWNER, _FAMILY, _FLAGS, _UNREAD, _LPORT, _RPORT, _LADDR, _RADDR) = (
    _at[name] + 1 for name in _READ)
SHAPE = slice(8 + record.RawEvent.linger_jiffies.offset,
              8 + record.RawEvent.owner_comm.offset + record.RawEvent.owner_comm.size)
F_QUEUES, F_SOFTIRQ = record.F_QUEUES, record.F_SOFTIRQ
_RST_KINDS = {value for value, name in record.KIND_NAMES.items() if name in ("rst_sent", "rst_received")}

# Markers for the per-event fields, in the record and in the explanation.
_M = {name: f"@@rsttrace:{name}@@" for name in ("time", "ktime", "laddr", "lport", "raddr", "rport", "inode",
                                                "cookie", "unread", "explanation")}
_LOCAL, _REMOTE, _UNREAD_MARK = "\0L\0", "\0R\0", "\0U\0"


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
    __slots__ = ("emit", "kind", "reason", "count_key", "per_netns", "line", "values")

    def __init__(self, ev: Event, emit: bool, per_netns: Counter):
        self.emit = emit                        # passes --reason and the process filters
        self.kind, self.reason = ev.kind, ev.reason
        self.count_key = (ev.kind, ev.reason)
        self.per_netns = per_netns              # Session.netns_counts[netns]
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
        line = orjson.dumps(rec, option=orjson.OPT_NON_STR_KEYS).replace(b"%", b"%%")
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
    return orjson.dumps(text)[1:-1]


class FastPath:
    """Per chunk of ring records: template lines for known shapes, Session.handle for the rest."""

    def __init__(self, session: "Session"):
        self.session = session
        self.decoder = session.decoder
        self.attributor = session.attributor
        self.out = [s.write_event_lines for s in session.sinks if getattr(s, "write_event_json", None)]
        self.templates: dict[tuple, Template] = {}
        self._expires = time.monotonic() + TEMPLATE_TTL_S
        self.fast = self.slow = 0               # events each way (tests, benchmarks)
        self._addrs4: dict[bytes, bytes] = {}
        self._addrs6: dict[bytes, bytes] = {}
        self._second, self._second_text = -1, b""

    def key(self, t: tuple, shape: bytes) -> bytes | tuple | None:
        """The shape of a record (t: its FAST_RECORD fields), or None if the shape does not decide
        its enrichment. (process() has this inline: a call per record costs more than the test.)"""
        flags = t[_FLAGS]
        if t[_KIND] not in _RST_KINDS or flags & F_QUEUES:
            return None
        if flags & F_SOFTIRQ or not self.attributor.context_known:
            if t[_OWNER]:
                return shape                    # the process seen calling connect()
            if t[_INO]:
                return None                     # the fd holder, looked up per socket
            return (shape, t[_LADDR], t[_LPORT])    # no socket: the local port's listener, or nobody
        return shape                            # the task on the CPU

    def process(self, chunk: bytes) -> int:
        """Every record of a ring-reader chunk, in ring order; how many."""
        now = time.monotonic()
        if now >= self._expires or len(self.templates) > MAX_TEMPLATES:
            self.templates.clear()
            self._expires = now + TEMPLATE_TTL_S
        decoder = self.decoder
        decoder.refresh()
        size = record.EVENT_SIZE
        templates = self.templates
        in_context = self.attributor.context_known
        shape_from, shape_to = SHAPE.start, SHAPE.stop
        plan: list[tuple] = []
        slow: list[Event] = []
        at = -_STRIDE
        for t in FAST_RECORD.iter_unpack(chunk):
            at += _STRIDE
            if t[0] != size:
                continue                        # discarded in the kernel
            # self.key(), inline
            flags = t[_FLAGS]
            if t[_KIND] not in _RST_KINDS or flags & F_QUEUES:
                key = None
            elif (flags & F_SOFTIRQ or not in_context) and not t[_OWNER]:
                key = None if t[_INO] else (chunk[at + shape_from:at + shape_to], t[_LADDR], t[_LPORT])
            else:
                key = chunk[at + shape_from:at + shape_to]
            tmpl = templates.get(key) if key is not None else None
            if tmpl is None:
                ev = decoder._event(RING_RECORD.unpack_from(chunk, at))
                slow.append(ev)
                plan.append((t, key, ev))
            else:
                plan.append((t, key, tmpl))
        if slow:
            self.attributor.prepare(slow)
        s = self.session
        count, limit, counts = s.options.count, s.limit, s.counts
        wall = decoder._mono_to_wall
        addrs4, addrs6, remember = self._addrs4, self._addrs6, self._remember
        second, second_text = self._second, self._second_text
        lines: list[bytes] = []
        for t, key, what in plan:
            if s._stop and count is not None and s.emitted >= count:
                break
            if type(what) is not Template:
                self.slow += 1
                if lines:                       # keep ring order
                    self._write(lines)
                    lines = []
                passed = s.handle(what)
                if key is not None and key not in templates:
                    templates[key] = Template(what, passed, s.netns_counts[what.netns])
                continue
            # What Session.handle does for an event of this shape, from the raw record.
            self.fast += 1
            what.per_netns[what.kind] += 1
            if not what.emit:
                continue
            if limit is not None and not limit.allow(time.monotonic(), what.kind, what.reason):
                continue
            counts[what.count_key] += 1
            la, ra = t[_LADDR], t[_RADDR]
            if t[_FAMILY] == AF_INET6:
                laddr = addrs6.get(la) or remember(la, AF_INET6)
                raddr = addrs6.get(ra) or remember(ra, AF_INET6)
            else:
                laddr = addrs4.get(la) or remember(la, AF_INET)
                raddr = addrs4.get(ra) or remember(ra, AF_INET)
            ktime, ino, cookie = t[_KTIME], t[_INO], t[_COOKIE]
            secs, ns = divmod(ktime + wall, 1_000_000_000)
            if secs != second:                  # records.rfc3339()'s whole seconds, made once a second
                second, second_text = secs, records.rfc3339(secs * 1_000_000_000)[:-8].encode()
            lines.append(what.line % what.values((
                second_text, ns // 1000, ktime, laddr, t[_LPORT], raddr, t[_RPORT],
                b"%d" % ino if ino else b"null", b"%d" % cookie if cookie else b"null", t[_UNREAD])))
            s.emitted += 1
            if count is not None and s.emitted >= count:
                s._stop = True
        self._second, self._second_text = second, second_text
        if lines:
            self._write(lines)
        return len(plan)

    def _remember(self, raw: bytes, family: int) -> bytes:
        """An address's text, kept for the next records (the raw IPv4 field has 12 bytes of zeros
        after the address)."""
        if len(self._addrs4) + len(self._addrs6) > CACHE_MAX:
            self._addrs4.clear()
            self._addrs6.clear()
        text = self.decoder._text_addr(raw[:4] if family == AF_INET else raw, family).encode()
        (self._addrs4 if family == AF_INET else self._addrs6)[raw] = text
        return text

    def _write(self, lines: list[bytes]) -> None:
        for write_lines in self.out:
            write_lines(lines)
