"""Real network paths in private network namespaces, for the tests that ask "who really sent this RST?".

Each scenario builds hosts (one netns each, joined by veth pairs), a firewall, a router or a forgotten
connection, then `run()` makes the traffic and returns what the kernel and the wire say happened:
the errno each client call got, every SNMP counter's delta per netns, and the packets tcpdump saw on
every host. Nothing in a Result is assumed from the set-up; a test compares a tracer with it.

    with PathReset(after_bytes=1000) as s:
        t = tracer(...)                       # the test's tracer, started after the set-up
        r = s.run()
        records = t.stop()
    assert r.client_errors == ["ECONNRESET"] and r.delta[s.server.name]["TcpOutRsts"] == 0

IPv4 only: IPv6 is off in every netns, so the wire holds the scenario's packets and no ND/MLD.
This file is also the program that runs inside the netns (`python3 netpaths.py agent`): standard
library only, so /usr/bin/python3 runs it without the project's venv.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

PY = "/usr/bin/python3"
SENTINEL_PORT = 9          # discard: the capture's end marker goes to 127.0.0.1 there


# -- hosts ------------------------------------------------------------------------------------

def read_counters(text: str) -> dict[str, int]:
    """/proc/net/snmp and /proc/net/netstat text ("Group: names" / "Group: values" line pairs) → {GroupName: n},
    the names nstat prints (TcpOutRsts, TcpExtTCPChallengeACK, IcmpInDestUnreachs, ...)."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for header, values in zip(lines[0::2], lines[1::2]):
        group, _, names = header.partition(":")
        for name, num in zip(names.split(), values.partition(":")[2].split()):
            out[group + name] = int(num)
    return out


class Host:
    """One network namespace: rtp-<scenario tag>-<role>."""

    def __init__(self, tag: str, role: str):
        self.role = role
        self.name = f"rtp-{tag}-{role}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, timeout=10)
        try:
            self.inode = os.stat(f"/run/netns/{self.name}").st_ino
            self.run("ip", "link", "set", "lo", "up")
            # Before any veth exists: `default` is what new interfaces get.
            self.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
            self.sysctl("net.ipv6.conf.default.disable_ipv6", 1)
        except BaseException:
            self.delete()
            raise

    def __repr__(self) -> str:
        return f"Host({self.name})"

    def run(self, *argv: str, check: bool = True, timeout: float = 10, input: str | None = None
            ) -> subprocess.CompletedProcess:
        done = subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and done.returncode:
            raise AssertionError(f"{self.name}: {' '.join(argv)}: rc={done.returncode} {done.stderr.strip()}")
        return done

    def sysctl(self, key: str, value) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def nft(self, ruleset: str) -> None:
        self.run("nft", "-f", "-", input=ruleset)

    def counters(self) -> dict[str, int]:
        """Every Ip/Icmp/IcmpMsg/Tcp/Udp/TcpExt/IpExt/... counter of this netns, read inside it."""
        return read_counters(self.run("cat", "/proc/net/snmp", "/proc/net/netstat").stdout)

    def sockets(self, port: int) -> list[dict]:
        """TCP sockets of this netns with `port` at either end, as ss lists them: {state, local, peer,
        recv_q, send_q} (for a connection, send_q is its data not yet acked)."""
        rows = []
        for line in self.run("ss", "-Htan").stdout.splitlines():
            state, recv_q, send_q, local, peer = line.split()[:5]
            if local.rsplit(":", 1)[1] == str(port) or peer.rsplit(":", 1)[1] == str(port):
                rows.append({"state": state, "local": local, "peer": peer, "recv_q": int(recv_q),
                             "send_q": int(send_q)})
        return rows

    def ifnames(self) -> dict[int, str]:
        return {link["ifindex"]: link["ifname"] for link in json.loads(self.run("ip", "-j", "link").stdout)}

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


def link(a: Host, a_addr: str, b: Host, b_addr: str, prefix: int = 24) -> tuple[str, str]:
    """A veth pair between a and b, each end named after the host it leads to; returns (a's, b's) name."""
    a_if, b_if = f"to-{b.role}", f"to-{a.role}"
    a.run("ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    a.run("ip", "addr", "add", f"{a_addr}/{prefix}", "dev", a_if)
    b.run("ip", "addr", "add", f"{b_addr}/{prefix}", "dev", b_if)
    a.run("ip", "link", "set", a_if, "up")
    b.run("ip", "link", "set", b_if, "up")
    return a_if, b_if


def find_rule(host: Host, family: str, table: str, chain: str) -> dict:
    """The one rule of `family table chain`, as `nft -a -j list ruleset` in `host` shows it."""
    ruleset = json.loads(host.run("nft", "-a", "-j", "list", "ruleset").stdout)["nftables"]
    rules = [obj["rule"] for obj in ruleset if "rule" in obj and
             (obj["rule"]["family"], obj["rule"]["table"], obj["rule"]["chain"]) == (family, table, chain)]
    assert len(rules) == 1, f"{host}: {family} {table} {chain} holds {len(rules)} rules: {rules}"
    return {key: rules[0][key] for key in ("family", "table", "chain", "handle")}


def wait_for(what: str, cond, timeout: float = 10, every: float = 0.01):
    """Poll cond() until it returns something true; its value, or AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


# -- the wire ---------------------------------------------------------------------------------

TCP_FLAGS = "FSRPAUEW"        # bit 0 (FIN) .. bit 7 (CWR); RST|ACK → "RA", SYN|ACK → "SA", PSH|ACK → "PA"
PACKET_OUTGOING = 4           # SLL2 packet type (linux/if_packet.h PACKET_OUTGOING); 0 = to this host


@dataclass(frozen=True)
class Packet:
    """One TCP segment, or one ICMP error about a TCP segment, as tcpdump captured it on a host."""
    ifname: str
    direction: str            # "out": this host sent it on ifname; "in": it arrived on ifname
    proto: str                # "tcp" or "icmp"
    src: str
    dst: str
    sport: int                # TCP ports; for ICMP those of the quoted segment (which dst sent to src)
    dport: int
    ttl: int
    flags: str = ""           # TCP flags as letters, TCP_FLAGS order
    flag_bits: int = 0
    seq: int = 0
    ack: int = 0
    payload_len: int = 0      # of the skb captured: over a veth, a GSO packet larger than the MSS
    has_timestamp_option: bool = False
    icmp_type: int | None = None
    icmp_code: int | None = None

    @property
    def rst(self) -> bool:
        return "R" in self.flags

    @property
    def syn(self) -> bool:
        return "S" in self.flags


def _tcp_options_have_timestamp(opts: bytes) -> bool:
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if kind == 8:
            return True
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        i += opts[i + 1]
    return False


def _decode_ip(ifname: str, direction: str, ip: bytes, token: bytes) -> Packet | str | None:
    """A Packet, "sentinel" for the capture's end marker, None for anything else (ARP, UDP, ...)."""
    if len(ip) < 20 or ip[0] >> 4 != 4:
        return None
    ihl = (ip[0] & 15) * 4
    total, ttl, proto = struct.unpack("!H", ip[2:4])[0], ip[8], ip[9]
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    l4 = ip[ihl:]
    if proto == socket.IPPROTO_UDP:
        return "sentinel" if token in l4 else None
    if proto == socket.IPPROTO_TCP:
        sport, dport, seq, ack, off, bits = struct.unpack("!HHIIBB", l4[:14])
        doff = (off >> 4) * 4
        return Packet(ifname, direction, "tcp", src, dst, sport, dport, ttl,
                      flags="".join(c for i, c in enumerate(TCP_FLAGS) if bits >> i & 1), flag_bits=bits,
                      seq=seq, ack=ack, payload_len=total - ihl - doff,
                      has_timestamp_option=_tcp_options_have_timestamp(l4[20:doff]))
    if proto == socket.IPPROTO_ICMP and len(l4) >= 8 + 20:
        quoted = l4[8:]
        if quoted[9] != socket.IPPROTO_TCP:
            return None             # e.g. the sentinel's own port unreachable on lo
        q_ihl = (quoted[0] & 15) * 4
        sport, dport = struct.unpack("!HH", quoted[q_ihl:q_ihl + 4])
        return Packet(ifname, direction, "icmp", src, dst, sport, dport, ttl, icmp_type=l4[0], icmp_code=l4[1])
    return None


def read_pcap(path: str, ifnames: dict[int, str], token: bytes) -> tuple[list[Packet], bool]:
    """The TCP/ICMP packets of a LINUX_SLL2 pcap file, and whether the sentinel is in it."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return [], False
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    assert struct.unpack(endian + "I", data[20:24])[0] == 276, "not LINUX_SLL2"
    packets, seen_sentinel, off = [], False, 24
    while off + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[off + 8:off + 12])[0]
        rec = data[off + 16:off + 16 + incl]
        off += 16 + incl
        if len(rec) < incl:
            break                   # tcpdump is still writing this one
        ethertype, _, ifindex, _, pkttype = struct.unpack("!HHIHB", rec[:11])
        if ethertype != 0x0800:
            continue
        direction = "out" if pkttype == PACKET_OUTGOING else "in"
        got = _decode_ip(ifnames.get(ifindex, str(ifindex)), direction, rec[20:], token)
        if got == "sentinel":
            seen_sentinel = True
        elif got is not None:
            packets.append(got)
    return packets, seen_sentinel


class Capture:
    """tcpdump on every interface of a host, from before the traffic to a marker sent after it."""

    def __init__(self, host: Host, tmpdir: str):
        self.host = host
        self.path = os.path.join(tmpdir, f"{host.role}.pcap")
        self._err_path = self.path + ".err"
        self._err = open(self._err_path, "w")
        # -y LINUX_SLL2: every packet says its interface and whether this host sent it. --immediate-mode
        # and -U: each packet reaches the file when captured, so the marker can be waited for.
        self.proc = subprocess.Popen(["ip", "netns", "exec", host.name, "tcpdump", "-i", "any", "-y", "LINUX_SLL2",
                                      "-nn", "-U", "--immediate-mode", "-Z", "root", "-s", "256", "-w", self.path],
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        try:
            # tcpdump says "listening on" once its socket is open: later packets are captured.
            wait_for(f"tcpdump in {host.name}", lambda: self.proc.poll() is not None or
                     "listening on" in self._stderr())
            assert self.proc.poll() is None, f"tcpdump in {host.name} exited: {self._stderr()}"
        except BaseException:
            self.kill()
            raise

    def _stderr(self) -> str:
        with open(self._err_path) as f:
            return f.read()

    def stop(self) -> list[Packet]:
        """Everything captured so far. A UDP marker to 127.0.0.1 goes out after the traffic; once it is in the
        file, so is every packet the host saw before it."""
        token = secrets.token_hex(8).encode()
        ifnames = self.host.ifnames()
        self.host.run("bash", "-c", f"echo rtp-sentinel-{token.decode()} > /dev/udp/127.0.0.1/{SENTINEL_PORT}")
        def complete():
            packets, done = read_pcap(self.path, ifnames, token)
            return (packets,) if done else None       # a tuple: true even when no packet came
        [packets] = wait_for(f"the end marker in {self.host.name}'s capture", complete)
        self.kill()
        return packets

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._err.close()


# -- programs inside the netns ----------------------------------------------------------------

class Agent:
    """`python3 netpaths.py agent` inside a host: holds sockets, does one JSON command at a time."""

    def __init__(self, host: Host):
        self.host = host
        self.proc = subprocess.Popen(["ip", "netns", "exec", host.name, PY, os.path.abspath(__file__), "agent"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buf = b""
        self.pid = self._reply(10)["pid"]

    def _reply(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError(f"agent in {self.host.name} did not answer in {timeout} s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"agent in {self.host.name} exited: rc={self.proc.wait(timeout=5)}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, op: str, timeout: float = 5, calls: int = 1, **args) -> dict:
        """Run `op`; each of its `calls` socket calls gives up after `timeout` s, this side a little later."""
        self.proc.stdin.write(json.dumps({"op": op, "timeout": timeout, **args}).encode() + b"\n")
        self.proc.stdin.flush()
        reply = self._reply(timeout * calls + 5)
        if "failed" in reply:
            raise AssertionError(f"agent in {self.host.name}: {op} {args}: {reply['failed']}")
        return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)


def _errname(e: OSError) -> str:
    # TIMEOUT is the agent's own give-up (socket timeout), not the kernel's ETIMEDOUT.
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "TIMEOUT"


def agent_main() -> None:
    socks: dict[int, socket.socket] = {}

    def listen(addr, port, timeout):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(16)
        socks[s.fileno()] = s
        return {"sock": s.fileno()}

    def accept(sock, timeout):
        socks[sock].settimeout(timeout)
        c, peer = socks[sock].accept()
        socks[c.fileno()] = c
        return {"sock": c.fileno(), "peer_port": peer[1]}

    def connect(addr, port, timeout):
        """One attempt from a port bound first, so the port is known whatever happens."""
        s = socket.socket()
        s.bind(("0.0.0.0", 0))
        local_port = s.getsockname()[1]
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
        except OSError as e:
            s.close()
            return {"error": _errname(e), "port": local_port}
        socks[s.fileno()] = s
        return {"error": None, "port": local_port, "sock": s.fileno()}

    def connects(addr, port, n, timeout):
        tries = [connect(addr, port, timeout) for _ in range(n)]
        for t in tries:
            if "sock" in t:
                socks.pop(t["sock"]).close()
        return {"errors": [t["error"] for t in tries], "ports": [t["port"] for t in tries]}

    def send(sock, nbytes, timeout):
        socks[sock].settimeout(timeout)
        socks[sock].sendall(b"r" * nbytes)
        return {"sent": nbytes}

    def recv_exact(sock, nbytes, timeout):
        socks[sock].settimeout(timeout)
        got = 0
        while got < nbytes:
            chunk = socks[sock].recv(nbytes - got)
            if not chunk:
                return {"received": got, "error": "EOF"}
            got += len(chunk)
        return {"received": got, "error": None}

    def request(sock, nbytes, timeout):
        """Send a request, wait for the answer's first byte: the first call that fails, and its errno."""
        s = socks[sock]
        s.settimeout(timeout)
        try:
            s.sendall(b"q" * nbytes)
        except OSError as e:
            return {"error": _errname(e), "call": "send"}
        try:
            data = s.recv(1)
        except OSError as e:
            return {"error": _errname(e), "call": "recv"}
        return {"error": None if data else "EOF", "call": "recv"}

    def abort(sock, timeout):
        """close() with SO_LINGER {1, 0}: the kernel sends an RST and forgets the connection at once."""
        s = socks.pop(sock)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        return {}

    def close(sock, timeout):
        socks.pop(sock).close()
        return {}

    ops = {f.__name__: f for f in (listen, accept, connect, connects, send, recv_exact, request, abort, close)}
    print(json.dumps({"pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            reply = ops[req.pop("op")](**req)
        except Exception as e:              # reported, and the harness fails the scenario with it
            reply = {"failed": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


# -- scenarios --------------------------------------------------------------------------------

@dataclass
class Result:
    client_errors: list[str]                  # errno name per attempt (ECONNREFUSED, ECONNRESET, ...)
    delta: dict[str, dict[str, int]]          # host name → counter → after − before the traffic
    wire: dict[str, list[Packet]]             # host name → packets captured on its interfaces
    client_ports: list[int] = field(default_factory=list)

    def packets(self, host: Host, **match) -> list[Packet]:
        return [p for p in self.wire[host.name] if all(getattr(p, k) == v for k, v in match.items())]

    def rsts(self, host: Host, **match) -> list[Packet]:
        return [p for p in self.packets(host, proto="tcp", **match) if p.rst]


@dataclass
class PathResetResult(Result):
    error_call: str = ""                      # "send" or "recv": where the client met the reset
    response_bytes: int = 0
    rst_ttl: int = 0                          # the RST's TTL as it arrived at the client
    server_ttl: int = 0                       # the server's segments' TTL as they arrived at the client


class Scenario:
    """Hosts, agents and a temporary folder, all removed on exit (also when the set-up fails)."""

    port: int

    def __init__(self):
        self.tag = secrets.token_hex(3)
        self.hosts: list[Host] = []
        self.agents: list[Agent] = []
        self._tmp: str | None = None

    def __enter__(self):
        try:
            self._tmp = tempfile.mkdtemp(prefix=f"rtp-{self.tag}-")
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def build(self) -> None:
        raise NotImplementedError

    def host(self, role: str) -> Host:
        h = Host(self.tag, role)
        self.hosts.append(h)
        return h

    def agent(self, host: Host) -> Agent:
        a = Agent(host)
        self.agents.append(a)
        return a

    def close(self) -> None:
        for a in self.agents:
            a.stop()
        for h in self.hosts:
            h.delete()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def observe(self, traffic):
        """traffic() between two counter snapshots, with tcpdump on every host: (its value, delta, wire)."""
        captures: list[Capture] = []
        try:
            for h in self.hosts:
                captures.append(Capture(h, self._tmp))
            before = {h.name: h.counters() for h in self.hosts}
            value = traffic()
            after = {h.name: h.counters() for h in self.hosts}
            wire = {c.host.name: c.stop() for c in captures}
        finally:
            for c in captures:
                c.kill()
        delta = {name: {k: v - before[name].get(k, 0) for k, v in after[name].items()} for name in after}
        return value, delta, wire


class ClosedService(Scenario):
    """A live service behind a firewall REJECT in the server's netns: nothing reaches the listener, and the
    answer (RST or ICMP port unreachable) is nf_reject's, not TCP's: the server's TcpOutRsts do not move.

    Each attempt's RST answers its SYN: flags RA, seq 0, ack = ISN + 1, no options, TTL 64. The ICMP
    answer refuses too: it comes back inside connect() (veth delivers it in the same syscall) while the
    socket is locked, so tcp_v4_err counts TcpExtLockDroppedIcmps and keeps ECONNREFUSED as a soft error,
    but queues the ICMP on the socket's error queue (SYN_SENT, 6.x): poll() wakes with POLLERR and
    SO_ERROR says ECONNREFUSED at once. (A blocking connect() would wait for the SYN's retransmission,
    1 s, and its second ICMP.) The agents connect with a timeout, i.e. the poll() way."""

    def __init__(self, backend: str = "nft", answer: str = "tcp-reset", connections: int = 3, port: int = 8301):
        super().__init__()
        assert backend in ("nft", "iptables") and answer in ("tcp-reset", "icmp")
        self.backend, self.answer, self.connections, self.port = backend, answer, connections, port
        self.client_addr, self.server_addr = "10.201.0.2", "10.201.0.1"

    def build(self) -> None:
        self.client, self.server = self.host("client"), self.host("server")
        link(self.client, self.client_addr, self.server, self.server_addr)
        # ICMP errors are rate limited per peer (a burst of 6, then 1/s): off here, so each attempt gets one.
        self.server.sysctl("net.ipv4.icmp_ratelimit", 0)
        self.listener = self.agent(self.server)
        self.listener.ask("listen", addr=self.server_addr, port=self.port)
        self.connector = self.agent(self.client)
        if self.backend == "nft":
            verdict = "reject with tcp reset" if self.answer == "tcp-reset" else "reject"
            self.server.nft(f"""
                table inet rtp_fw {{
                    chain input {{
                        type filter hook input priority filter; policy accept;
                        tcp dport {self.port} {verdict}
                    }}
                }}""")
            self.rule = find_rule(self.server, "inet", "rtp_fw", "input")
        else:
            with_ = ["--reject-with", "tcp-reset"] if self.answer == "tcp-reset" else []
            self.server.run("iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", str(self.port), "-j", "REJECT",
                            *with_)
            self.rule = find_rule(self.server, "ip", "filter", "INPUT")

    def run(self) -> Result:
        tries, delta, wire = self.observe(lambda: self.connector.ask(
            "connects", addr=self.server_addr, port=self.port, n=self.connections, calls=self.connections))
        return Result(tries["errors"], delta, wire, tries["ports"])


class PathReset(Scenario):
    """A router between client and server forges the server's RST: its forward chain rejects the client's
    request (`tcp reset`) once the reply direction of the flow carried more than `after_bytes` bytes.

    The rule matches the client's data segments only (PSH: Linux sets it on the last segment of every
    write; its pure ACKs never carry it). Without it the reset comes at the client's ACK of the
    response: that ACK never reaches the server, whose tail loss probe then hits a client without the
    connection, which answers with an RST of its own, late, maybe after run(); and an ACK of part of
    the response would get a forged RST that is out of window (a challenge ACK).
    The server sends its response, then nothing, and the request leaves only once the server holds the
    ACK of all of it (its Send-Q is 0): the request's ack is the client's rcv_nxt, so the forged RST
    (seq = that ack) is exactly in window, and the server has nothing left to retransmit to a client
    that no longer has the connection."""

    def __init__(self, after_bytes: int = 1000, port: int = 8302, request_bytes: int = 100):
        super().__init__()
        self.after_bytes, self.port, self.request_bytes = after_bytes, port, request_bytes
        self.response_bytes = after_bytes + 1       # payload alone is over the limit
        self.client_addr, self.router_client_addr = "10.202.1.2", "10.202.1.1"
        self.router_server_addr, self.server_addr = "10.202.2.1", "10.202.2.2"

    def build(self) -> None:
        self.client, self.router, self.server = self.host("client"), self.host("router"), self.host("server")
        link(self.client, self.client_addr, self.router, self.router_client_addr)
        link(self.router, self.router_server_addr, self.server, self.server_addr)
        self.client.run("ip", "route", "add", "default", "via", self.router_client_addr)
        self.server.run("ip", "route", "add", "default", "via", self.router_server_addr)
        self.router.sysctl("net.ipv4.ip_forward", 1)
        # `ct reply bytes` turns conntrack accounting on in this netns by itself (nf_conntrack_acct = 1).
        self.router.nft(f"""
            table inet rtp_fw {{
                chain forward {{
                    type filter hook forward priority filter; policy accept;
                    tcp dport {self.port} tcp flags & psh == psh ct reply bytes > {self.after_bytes} \\
                        reject with tcp reset
                }}
            }}""")
        self.rule = find_rule(self.router, "inet", "rtp_fw", "forward")
        self.srv = self.agent(self.server)
        self.listener = self.srv.ask("listen", addr=self.server_addr, port=self.port)["sock"]
        self.cli = self.agent(self.client)

    def run(self) -> PathResetResult:
        def traffic():
            conn = self.cli.ask("connect", addr=self.server_addr, port=self.port)
            assert conn["error"] is None, conn
            accepted = self.srv.ask("accept", sock=self.listener)["sock"]
            self.srv.ask("send", sock=accepted, nbytes=self.response_bytes)
            got = self.cli.ask("recv_exact", sock=conn["sock"], nbytes=self.response_bytes)
            assert got == {"received": self.response_bytes, "error": None}, got
            wait_for("the server's response to be acked", lambda: [
                c for c in self.server.sockets(self.port) if c["state"] == "ESTAB" and c["send_q"] == 0])
            return conn["port"], self.cli.ask("request", sock=conn["sock"], nbytes=self.request_bytes)

        (port, answer), delta, wire = self.observe(traffic)
        at_client = [p for p in wire[self.client.name] if p.direction == "in" and p.proto == "tcp"]
        rst_ttls = {p.ttl for p in at_client if p.rst}
        server_ttls = {p.ttl for p in at_client if not p.rst and p.src == self.server_addr}
        return PathResetResult([answer["error"]], delta, wire, [port], error_call=answer["call"],
                               response_bytes=self.response_bytes,
                               rst_ttl=rst_ttls.pop() if len(rst_ttls) == 1 else 0,
                               server_ttl=server_ttls.pop() if len(server_ttls) == 1 else 0)


class ForgottenConnection(Scenario):
    """An established connection that one side forgot without a word (its RST or FIN was dropped by nft on
    the way out), then the other side speaks on it.

    no_listener: the server forgot and no longer listens; the client's data gets the server stack's RST
                 for no socket (kernel reason NO_SOCKET).
    listener:    the server forgot the connection but still listens on the port: the listener answers
                 the client's data with an RST (kernel reason TCP_FLAGS: an ACK to a listener).
    rst_in:      the client forgot; the server aborts (SO_LINGER {1, 0}): the RST arrives at the client's
                 netns for a connection it no longer has, which drops it and answers nothing.
    conntrack:   kubernetes#74839: client → router's own address:port, DNAT to the server. The router's
                 conntrack entry is deleted and nf_conntrack_tcp_loose=0, so the client's next segment is
                 INVALID, skips DNAT, and the router's own stack answers it with a NO_SOCKET RST from the
                 service address.

    The forgetting happens on entry (a tracer started after it sees only run()'s traffic); the states it
    left, as ss lists them, are in `sockets_before_run`."""

    VARIANTS = ("no_listener", "listener", "rst_in", "conntrack")

    def __init__(self, variant: str, port: int = 8303, request_bytes: int = 100):
        super().__init__()
        assert variant in self.VARIANTS, variant
        self.variant, self.port, self.request_bytes = variant, port, request_bytes
        self.router: Host | None = None
        self.dnat: dict | None = None                 # conntrack: {service: (addr, port), backend: (addr, port)}
        self.conntrack_entry: dict | None = None      # conntrack: the entry deleted, as conntrack -L showed it
        if variant == "conntrack":
            self.client_addr, self.service_addr = "10.203.1.2", "10.203.1.1"     # the service: the router's own
            self.router_server_addr, self.server_addr = "10.203.2.1", "10.203.2.2"
        else:
            self.client_addr, self.server_addr = "10.203.0.2", "10.203.0.1"
            self.service_addr = self.server_addr

    def build(self) -> None:
        self.client = self.host("client")
        if self.variant == "conntrack":
            self.router, self.server = self.host("router"), self.host("server")
            link(self.client, self.client_addr, self.router, self.service_addr)
            link(self.router, self.router_server_addr, self.server, self.server_addr)
            self.client.run("ip", "route", "add", "default", "via", self.service_addr)
            self.server.run("ip", "route", "add", "default", "via", self.router_server_addr)
            self.router.sysctl("net.ipv4.ip_forward", 1)
            self.router.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0)    # don't pick up mid-stream flows
            self.router.nft(f"""
                table ip rtp_nat {{
                    chain prerouting {{
                        type nat hook prerouting priority dstnat; policy accept;
                        ip daddr {self.service_addr} tcp dport {self.port} dnat to {self.server_addr}:{self.port}
                    }}
                }}""")
            self.rule = find_rule(self.router, "ip", "rtp_nat", "prerouting")
        else:
            self.server = self.host("server")
            link(self.client, self.client_addr, self.server, self.server_addr)
        self.srv, self.cli = self.agent(self.server), self.agent(self.client)
        self.listener = self.srv.ask("listen", addr=self.server_addr, port=self.port)["sock"]
        conn = self.cli.ask("connect", addr=self.service_addr, port=self.port)
        assert conn["error"] is None, conn
        self.client_sock, self.client_port = conn["sock"], conn["port"]
        self.server_sock = self.srv.ask("accept", sock=self.listener)["sock"]
        self.forget()
        self.sockets_before_run = {h.name: h.sockets(self.port) for h in self.hosts}

    def _silently(self, host: Host, sport: int, dport: int, abort) -> None:
        """abort() while `host` drops its own segments sport → dport; then the drop goes."""
        host.nft(f"""
            table inet rtp_forget {{
                chain output {{
                    type filter hook output priority filter; policy accept;
                    tcp sport {sport} tcp dport {dport} drop
                }}
            }}""")
        abort()
        wait_for(f"{host.name} to forget port {sport}", lambda: not [
            s for s in host.sockets(self.port) if s["state"] != "LISTEN"])
        host.run("nft", "delete", "table", "inet", "rtp_forget")

    def forget(self) -> None:
        if self.variant in ("no_listener", "listener"):
            self._silently(self.server, self.port, self.client_port,
                           lambda: self.srv.ask("abort", sock=self.server_sock))
            if self.variant == "no_listener":
                self.srv.ask("close", sock=self.listener)
        elif self.variant == "rst_in":
            self._silently(self.client, self.client_port, self.port,
                           lambda: self.cli.ask("abort", sock=self.client_sock))
        else:
            self.conntrack_entry = entry = self._conntrack_entry()
            self.dnat = {"service": (entry["orig"]["dst"], entry["orig"]["dport"]),
                         "backend": (entry["reply"]["src"], entry["reply"]["sport"])}
            self.router.run("conntrack", "-D", "-p", "tcp", "--orig-src", self.client_addr,
                            "--orig-port-src", str(self.client_port))
            assert self._conntrack_entry() is None, "the conntrack entry is still there"

    def _conntrack_entry(self) -> dict | None:
        """The router's conntrack entry of the client's connection: orig and reply tuples, state."""
        out = self.router.run("conntrack", "-L", "-p", "tcp", "--orig-src", self.client_addr,
                              "--orig-port-src", str(self.client_port)).stdout
        lines = [line for line in out.splitlines() if line.startswith("tcp")]
        if not lines:
            return None
        [line] = lines
        pairs = re.findall(r"(src|dst|sport|dport)=(\S+)", line)
        orig, reply = dict(pairs[:4]), dict(pairs[4:8])
        for t in (orig, reply):
            t["sport"], t["dport"] = int(t["sport"]), int(t["dport"])
        return {"state": line.split()[3], "orig": orig, "reply": reply}

    def run(self) -> Result:
        def traffic():
            if self.variant != "rst_in":
                answer = self.cli.ask("request", sock=self.client_sock, nbytes=self.request_bytes)
                return [answer["error"]]
            # The RST is handled in the client netns' softirq, maybe after abort() returned: wait until
            # its TCP counted the segment in.
            seen = self.client.counters()["TcpInSegs"]
            self.srv.ask("abort", sock=self.server_sock)
            wait_for("the server's RST at the client", lambda: self.client.counters()["TcpInSegs"] > seen)
            return []

        errors, delta, wire = self.observe(traffic)
        return Result(errors, delta, wire, [self.client_port])


if __name__ == "__main__":
    if sys.argv[1:] == ["agent"]:
        agent_main()
    else:
        sys.exit("usage: python3 netpaths.py agent")
