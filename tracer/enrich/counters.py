"""What the kernel itself counted: /proc/net/snmp and /proc/net/netstat of a network namespace.

rsttrace's counts are compared with these deltas (coverage); tests use the same reader.
Names are "<Group><Field>" as nstat prints them: TcpOutRsts, TcpExtListenOverflows, ...
"""
from __future__ import annotations

FILES = ("snmp", "netstat")
# The counters that move with the events rsttrace reports.
INTERESTING = ("TcpOutRsts", "TcpEstabResets", "TcpExtTCPAbortOnClose", "TcpExtTCPAbortOnData",
               "TcpExtTCPAbortOnLinger", "TcpExtTCPAbortOnMemory", "TcpExtTCPAbortOnTimeout",
               "TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtTCPReqQFullDrop", "TcpExtSyncookiesSent")


def parse(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    lines = text.splitlines()
    for header, values in zip(lines[0::2], lines[1::2]):
        group, _, names = header.partition(":")
        _, _, nums = values.partition(":")
        for name, num in zip(names.split(), nums.split()):
            try:
                out[group + name] = int(num)
            except ValueError:
                continue
    return out


def read(net_dir: str = "/proc/self/net") -> dict[str, int]:
    """All counters of the netns whose /proc/<pid>/net directory is `net_dir`."""
    out: dict[str, int] = {}
    for name in FILES:
        try:
            with open(f"{net_dir}/{name}") as f:
                out.update(parse(f.read()))
        except OSError:
            continue
    return out


def delta(before: dict[str, int], after: dict[str, int], names=INTERESTING) -> dict[str, int]:
    return {n: after.get(n, 0) - before.get(n, 0) for n in names if n in after}
