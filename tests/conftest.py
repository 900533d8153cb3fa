"""Shared fixtures: private network namespaces, scenario runners, and a real rsttrace process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = REPO / "scripts" / "repro" / "resets.py"
BURST = str(REPO / "scripts" / "repro" / "burst.py")
SCHEMA = REPO / "schema" / "rsttrace-v1.schema.json"
RSTTRACE = [sys.executable, "-m", "tracer"]


# tests/vm/inside runs only inside the Debian 6.1 VM (tests/vm/test_debian61.py boots it).
collect_ignore = [] if os.environ.get("RSTTRACE_IN_VM") else ["vm/inside"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/kernel/" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session")
def root():
    # The kernel tests are the proof that the tracer works: they must run, never skip. scripts/test
    # and CI run as root; anywhere else this fails loudly instead of passing silently.
    assert os.geteuid() == 0, "the kernel tests load BPF programs and create netns: run scripts/test as root"


@pytest.fixture(scope="session")
def validator():
    import jsonschema
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


class Netns:
    def __init__(self, name: str):
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        self.inode = os.stat(f"/run/netns/{name}").st_ino

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True,
                              check=check, timeout=timeout)

    def scenario(self, name: str, addr: str, port: int, *extra: str) -> dict:
        out = self.run("/usr/bin/python3", str(SCENARIOS), name, addr, str(port), *extra)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def sysctl(self, key: str, value) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def counters(self) -> dict[str, int]:
        from tracer.enrich import counters
        snmp = self.run("cat", "/proc/net/snmp").stdout
        netstat = self.run("cat", "/proc/net/netstat").stdout
        return {**counters.parse(snmp), **counters.parse(netstat)}

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def prog_ids_of(pid: int) -> set[int]:
    """BPF programs held by process `pid` (its fds' fdinfo says prog_id)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


@pytest.fixture
def netns(root):
    ns = Netns(f"rsttrace-t-{uuid.uuid4().hex[:8]}")
    yield ns
    ns.delete()


@pytest.fixture
def make_netns(root):
    made = []

    def _make():
        ns = Netns(f"rsttrace-t-{uuid.uuid4().hex[:8]}")
        made.append(ns)
        return ns
    yield _make
    for ns in made:
        ns.delete()


@pytest.fixture
def rsyslog(root, tmp_path):
    """Debian's rsyslogd on a private unix socket and a loopback UDP port (tests/receivers.py)."""
    from receivers import Rsyslog
    r = Rsyslog(tmp_path / "rsyslog")
    yield r
    r.close()


@pytest.fixture
def prometheus(root, tmp_path):
    """Debian's prometheus on loopback; the test's start(*targets) runs it (tests/receivers.py)."""
    from receivers import Prometheus
    p = Prometheus(tmp_path / "prometheus")
    yield p
    p.close()


class Tracer:
    """rsttrace as a user runs it: a separate process, JSON lines on stdout."""

    def __init__(self, args: list[str], validator=None, env=None, argv_prefix: list[str] | None = None):
        self.args = args
        self.validator = validator
        self.stderr_lines: list[str] = []
        self.proc = subprocess.Popen((argv_prefix or []) + RSTTRACE + args, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self._attached = threading.Event()
        self._stderr_thread = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_thread.start()
        # Read stdout as it comes, as a consumer would: a full pipe would stall rsttrace's loop.
        self._stdout_parts: list[str] = []
        self._stdout_thread = threading.Thread(target=self._read_stdout, daemon=True)
        self._stdout_thread.start()

    def _read_stdout(self):
        while chunk := self.proc.stdout.read(65536):
            self._stdout_parts.append(chunk)

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))
            if "attached in" in line:
                self._attached.set()

    def wait_attached(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self._attached.is_set():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"rsttrace did not attach: rc={self.proc.poll()} stderr={self.stderr_lines}")
            time.sleep(0.02)

    def stop(self, sig=signal.SIGINT, timeout: float = 30) -> list[dict]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        killer = threading.Timer(timeout, self.proc.kill)
        killer.start()
        try:
            self.proc.wait()
            self._stdout_thread.join()
        finally:
            killer.cancel()
        out = "".join(self._stdout_parts)
        self._stderr_thread.join(timeout=5)
        self.returncode = self.proc.returncode
        self.stdout = out
        records = []
        if "--json" in self.args:
            for line in out.splitlines():
                rec = json.loads(line)
                if self.validator is not None:
                    self.validator.validate(rec)
                records.append(rec)
        return records


@pytest.fixture
def tracer(root, validator):
    started: list[Tracer] = []

    def _start(*args: str, validate: bool = True, **kw) -> Tracer:
        t = Tracer(list(args), validator if validate else None, **kw)
        started.append(t)
        t.wait_attached()
        time.sleep(0.05)
        return t
    yield _start
    for t in started:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


# sock:inet_sock_set_state's program: a BTF tracepoint here (6.18), a raw one where a kernel refuses
# tp_btf (RSTTRACE_STATE_HOOK=raw forces it, for the tests that run on both).
STATE_HOOKS = {"tp_btf": "tracing", "raw": "raw_tracepoint"}     # → bpftool's program type


def state_hook_env(hook: str) -> dict:
    return dict(os.environ, RSTTRACE_STATE_HOOK=hook)


def state_hook_type(pid: int) -> str:
    """The type of the program process `pid` has on sock:inet_sock_set_state, as the kernel lists it."""
    out = subprocess.run(["bpftool", "perf", "-j"], capture_output=True, text=True, check=True).stdout
    [prog_id] = [a["prog_id"] for a in json.loads(out or "[]")
                 if a.get("pid") == pid and a.get("tracepoint") == "inet_sock_set_state"]
    prog = json.loads(subprocess.run(["bpftool", "prog", "show", "id", str(prog_id), "-j"], capture_output=True,
                                     text=True, check=True).stdout)
    return prog["type"]


def delta(before: dict[str, int], after: dict[str, int], name: str) -> int:
    """How far kernel counter `name` moved between two Netns.counters() snapshots."""
    return after[name] - before[name]


def unexplained(records: list[dict], netns, counter: str) -> int:
    """What the kernel counted in `netns` where no hook saw a decision (the final reconciliation's
    `unexplained`, read per CPU at each later packet and once more at exit): the kernel does now and
    then not run a hook's program for a packet, and says so nowhere. 0 where the kernel's counters
    are not read per CPU."""
    summary = records[-1]
    rows = [n for n in summary.get("reconciliation") or [] if n["inode"] == netns.inode]
    return rows[0].get("unexplained", {}).get(counter, 0) if rows else 0


def events(records: list[dict], **match) -> list[dict]:
    """Event records whose fields equal `match` (dotted keys for nested fields)."""
    out = []
    for rec in records:
        if rec["type"] != "event":
            continue
        ok = True
        for key, want in match.items():
            value = rec
            for part in key.split("__"):
                value = value.get(part) if isinstance(value, dict) else None
            if value != want:
                ok = False
                break
        if ok:
            out.append(rec)
    return out


class Background:
    """A process inside the netns (server, stuck clients), reading one JSON line of facts."""

    def __init__(self, ns, *argv, pin: str | None = None):
        taskset = ["taskset", "-c", pin] if pin is not None else []
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, *taskset, "/usr/bin/python3", BURST, *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.facts = json.loads(self.proc.stdout.readline())

    def send(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out, _ = self.proc.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def drop_final_acks(ns, port: int, sports: str) -> None:
    """Lose the handshake's final ACK (and anything after it) of clients on `sports`, at the listener."""
    ns.run("nft", "add table inet rsttrace_test")
    ns.run("nft", "add chain inet rsttrace_test in { type filter hook input priority 0 ; }")
    ns.run("nft", f"add rule inet rsttrace_test in tcp dport {port} tcp sport {sports} tcp flags & (syn|ack) == ack drop")


def drop_syn_acks(ns, port: int) -> None:
    """Raw SYNs have no socket behind them: without this the netns' own stack would answer the
    SYN-ACKs with RSTs and empty the SYN queue."""
    ns.run("nft", "add table inet rsttrace_test")
    ns.run("nft", "add chain inet rsttrace_test in { type filter hook input priority 0 ; }")
    ns.run("nft", f"add rule inet rsttrace_test in tcp sport {port} tcp flags & (syn|ack) == syn|ack drop")


def map_ids_of(pid: int) -> set[int]:
    """The BPF maps process `pid` holds (map_id in its fds' fdinfo)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                ids |= {int(line.split()[1]) for line in f if line.startswith("map_id:")}
        except OSError:
            continue
    return ids


def failures_kept_by(tracer_pid: int) -> set[int]:
    """The processes whose failed syscalls the kernel keeps for this rsttrace (its app_failures map)."""
    maps = json.loads(subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True, text=True,
                                     check=True).stdout)
    [ours] = [m["id"] for m in maps if m.get("name") == "app_failures" and m["id"] in map_ids_of(tracer_pid)]
    dump = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "id", str(ours)], capture_output=True,
                                     text=True, check=True).stdout)
    return {int.from_bytes(bytes(int(b, 16) for b in entry["key"]), "little") for entry in dump}
