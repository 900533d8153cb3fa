"""Plain lines: one readable line per event, for terminals without the UI and for pipes."""
from __future__ import annotations

import sys

from ..events.decode import endpoint
from .output import LineOutput
from .records import one_line


def _endpoint(ep: dict, family: str) -> str:
    return endpoint(ep["addr"], ep["port"])


def format_event(rec: dict) -> str:
    kr = f" [{rec['kernel_reason']}]" if rec.get("kernel_reason") else ""
    proc = rec.get("process")
    who = f" {proc['comm']}/{proc['pid']}" if proc and proc.get("pid") else " -"
    if proc and proc.get("container"):
        who += f" container={proc['container']['id'][:12]}"
    state = f" {rec['state']}" if rec.get("state") else ""
    extra = ""
    sock = rec.get("socket") or {}
    if rec["reason"] == "closed_with_unread_data" and sock.get("unread_bytes") is not None:
        extra = f" unread={sock['unread_bytes']}"
    q = rec.get("queues")
    if q and q.get("accept_qlen") is not None:
        extra += f" acceptq={q['accept_qlen']}/{q.get('accept_qmax')}"
    netns = rec["netns"]["name"] or rec["netns"]["inode"]
    arrow = "<" if rec["event"] == "rst_received" else ">"
    return (f"{rec['time'][11:26]} {rec['event']:<12} {rec['reason']}{kr} "
            f"{_endpoint(rec['local'], rec['family'])} {arrow} {_endpoint(rec['remote'], rec['family'])}"
            f"{state} netns={netns}{who}{extra} | {rec['explanation']}")


def format_connection(rec: dict) -> str:
    """A connection's story, in one line: outcome, client → server, the server's netns."""
    netns = rec["server"]["netns"] or rec["client"]["netns"]
    where = f" netns={netns['name'] or netns['inode']}" if netns else ""
    errno = f" [{rec['errno']}]" if rec["errno"] else ""
    return (f"{rec['time'][11:26]} {'connection':<12} {rec['outcome']}{errno} "
            f"{_endpoint(rec['client'], rec['family'])} > {_endpoint(rec['server'], rec['family'])}{where} "
            f"| {rec['explanation']}")


class PlainSink:
    def __init__(self, output: LineOutput):
        self.output = output

    def emit(self, record: dict) -> None:
        kind = record["type"]
        if kind == "event":
            self.output.write_line(format_event(record))
        elif kind == "connection":
            self.output.write_line(format_connection(record))
        elif kind == "lost":
            # Losses go where the events go, so that nobody reads a stream with holes unawares.
            self.output.write_line(f"{record['time'][11:26]} LOST {record['lost']} events "
                                   f"(total {record['total_lost']}): ring buffer full")
        elif kind == "suppressed":
            self.output.write_line(f"{record['time'][11:26]} SUPPRESSED {one_line(record)}")
        elif kind in ("storm", "aggregate"):
            # Counts of what happened during a storm go where the events go, like losses.
            self.output.write_line(f"{record['time'][11:26]} {kind.upper()} {one_line(record)}")
        # coverage and summary are printed to stderr by the session

    def flush(self) -> None:
        self.output.flush()

    def reopen(self) -> None:
        self.output.reopen()

    def close(self) -> None:
        self.output.close()


def stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
