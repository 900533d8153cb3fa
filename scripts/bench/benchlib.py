"""Shared parts of the benchmarks: the tracers under test (rsttrace and its peers) as whole processes,
the storms of the load generator (rststorm.c), the kernel's accounting of BPF run time, and the
statistics every table uses. Network namespaces and background servers are the tests' own
(tests/conftest.py), and the kernel's counters are read with tracer's parser.

Every wait has a deadline; every storm is bounded in time and runs on 127.0.0.1 inside a netns made
for it (and deleted after), so nothing touches the host's traffic or sysctls.
"""
from __future__ import annotations

import ctypes
import glob
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
# The tests' helpers import pytest, which scripts/setup installs into the project's venv (bcc comes
# with its system site packages): the benchmarks run there, whichever python3 started them.
if Path(sys.prefix).resolve() != VENV_PYTHON.parents[1].resolve() and VENV_PYTHON.exists():
    os.execv(VENV_PYTHON, [str(VENV_PYTHON), *sys.argv])
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from conftest import Background, Netns as TestNetns, prog_ids_of      # noqa: E402
from receivers import OtlpReceiver                                    # noqa: E402
from tracer.enrich import counters                        # noqa: E402

BENCH = REPO / "scripts" / "bench"
OUT = REPO / ".bench-out"
RSTTRACE = REPO / ".venv" / "bin" / "rsttrace"
# RSTTRACE_BENCH_BASE=/path/to/another/checkout: that rsttrace runs beside this one, as the tool
# "rsttrace_base" (a change's cost, measured against its parent in the same run).
BASE_ENV = "RSTTRACE_BENCH_BASE"
# A boot's first start, each time: the cache it fills is emptied before every such start.
FIRST_START_CACHE = "/run/rsttrace-bench-first-start"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Ports below the ephemeral range (32768+), so that nobody's client port is mistaken for ours.
STORM_PORT = 23456          # the storms' listener (unread, conn); STORM_PORT + 1 is the closed port
OTHER_PORT = 24000          # "rsttrace filtering another port"; more untraced ports count up from here
IDLE_PORT = OTHER_PORT + 1000   # the idle established connections' listener: never traced, past the extra ports
MAX_STORM_S = 3600          # rststorm's own bound on SECONDS


# -- statistics ----------------------------------------------------------------------------------
def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def mean_ci(values: list[float]) -> dict:
    """Mean and the half-width of its 95 % confidence interval (t distribution)."""
    n = len(values)
    if n < 2:
        return {"mean": values[0] if values else None, "ci95": None, "n": n}
    t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(n, 2.2)
    return {"mean": statistics.mean(values), "ci95": t95 * statistics.stdev(values) / math.sqrt(n), "n": n}


def ci_verdict(m: dict, limit: float) -> bool | str | None:
    """Met (True) or missed (False) where the 95 % interval of a mean_ci() lies on one side of the
    limit; where it spans it, the measurement cannot tell."""
    if m.get("mean") is None or m.get("ci95") is None:
        return None
    if m["mean"] + m["ci95"] <= limit:
        return True
    if m["mean"] - m["ci95"] > limit:
        return False
    return "not decided: the interval spans the target"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def fmt(s: dict, spec: str = ".0f", unit: str = "") -> str:
    """median (min–max) of a summary()"""
    if s.get("median") is None:
        return "–"
    m, lo, hi = (format(s[k], spec) for k in ("median", "min", "max"))
    return f"{m}{unit} ({lo}–{hi})" if len(s["runs"]) > 1 else f"{m}{unit}"


def fmt_ratio(r: float | None, spec: str = ".2f") -> str:
    return "–" if r is None else f"{r:{spec}}×"


def write_result(name: str, result: dict, table: str) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / f"{name}.md").write_text(table + "\n")


def start_benchmark(name: str) -> None:
    """What every benchmark's main() does first: root or a one-line error; SIGTERM unwound like
    Ctrl-C; rsttrace byte-compiled."""
    if os.geteuid() != 0:
        print(f"scripts/bench/{name}: run as root (it loads BPF programs and makes network namespaces)",
              file=sys.stderr)
        sys.exit(3)
    # SIGTERM's default action ends the process on the spot, leaving its netns, storm and tracers
    # behind; as SystemExit, every with-block and finally runs. Once: a second SIGTERM during that
    # cleanup must not cut it short.
    def unwind(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, unwind)
    # rsttrace as scripts/setup leaves it: byte-compiled (a source edited since, with
    # PYTHONDONTWRITEBYTECODE set, would be compiled again at every start and counted in start-up).
    subprocess.run([str(VENV_PYTHON), "-m", "compileall", "-q", str(REPO / "tracer")],
                   stdout=subprocess.DEVNULL, check=False)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# -- the load generator --------------------------------------------------------------------------
def build_storm() -> str:
    """Compile scripts/bench/rststorm.c with the system compiler (again only when the source changed)."""
    src, exe = BENCH / "rststorm.c", OUT / "rststorm"
    OUT.mkdir(exist_ok=True)
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-o", str(exe), str(src)], check=True)
    return str(exe)


class Netns(TestNetns):
    """The tests' private netns (loopback up; counters()), made for one benchmark step and deleted
    when its with-block ends, with the TIME_WAIT sockets a storm leaves: no run inherits another's."""
    _made = 0

    def __init__(self):
        Netns._made += 1
        super().__init__(f"rsttrace-bench-{os.getpid()}-{Netns._made}")

    def __enter__(self) -> "Netns":
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def storm(self, exe: str, mode: str, port: int, seconds: float, procs: int = 2, rate: float = 0) -> dict:
        out = self.run(exe, mode, str(port), str(seconds), str(procs), str(int(rate)), check=False,
                       timeout=seconds + 30)
        if out.returncode != 0:
            raise RuntimeError(f"rststorm {mode} failed: {out.stderr.strip()}")
        return json.loads(out.stdout.strip().splitlines()[-1])


# A window's "fast rate": the 90th percentile of its quarter-second rates. What disturbs the storm
# on a VM comes from outside it and only ever slows it, in dips of a fraction of a second to a few
# seconds; a tracer's cost is paid by every connection, so it lowers every quarter-second alike.
# The fast rate is the best-of-N of timing practice: it leaves the dips out.
SUB_S = 0.25


class LongStorm:
    """One conn storm (2 workers) that runs through a whole measurement in its netns, measured in
    windows: connections per second from the netns's Tcp ActiveOpens (read through /proc/PID/net/snmp
    of the storm: no fork per sample), CPU from its workers' /proc/PID/stat. Windows next to each
    other in time are compared: what a fresh netns and a fresh storm vary by drops out."""

    def __init__(self, ns: Netns, exe: str, seconds: float):
        self.proc = subprocess.Popen(ns.argv(exe, "conn", str(STORM_PORT), str(seconds), "2"),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while len(self._workers()) < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rststorm conn did not start: {self.proc.stderr.read().strip()}")
            time.sleep(0.05)

    def _workers(self) -> list[str]:
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return f.read().split()
        except OSError:
            return []

    def sample(self, cpu: bool = True) -> tuple[float, int, float]:
        """(monotonic seconds, connections opened so far, the workers' CPU seconds so far (0: cpu=False))"""
        cpu_s = 0.0
        for pid in self._workers() if cpu else []:
            try:
                cpu_s += cpu_seconds(int(pid))
            except OSError:
                pass
        try:
            with open(f"/proc/{self.proc.pid}/net/snmp") as f:
                opens = counters.parse(f.read())["TcpActiveOpens"]
        except FileNotFoundError:
            raise self._stopped() from None
        return time.monotonic(), opens, cpu_s

    def window(self, seconds: float, tracer: "Tracer | None" = None) -> dict:
        """Rate and CPU per connection (the storm's and the tracer's) over the next `seconds`, and the
        window's fast rate (SUB_S)."""
        t0, n0, c0 = self.sample()
        tc0 = tracer.cpu() if tracer else 0.0
        points = [(t0, n0)]
        while points[-1][0] < t0 + seconds - 1e-3:
            # sleep to the next quarter-second mark of the window (no drift from the reads)
            time.sleep(max(0.0, min(t0 + seconds, points[-1][0] + SUB_S) - time.monotonic()))
            t, n, _ = self.sample(cpu=False)
            points.append((t, n))
        t1, n1, c1 = self.sample()
        tracer_cpu = tracer.cpu() - tc0 if tracer else 0.0
        conns = n1 - n0
        if self.proc.poll() is not None or conns <= 0:
            raise self._stopped()
        quarters = sorted((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(points, points[1:]) if b[0] - a[0] > SUB_S / 2)
        return {"conns_per_s": conns / (t1 - t0), "fast_conns_per_s": quarters[int(0.9 * (len(quarters) - 1))],
                "cpu_us_per_conn": 1e6 * (c1 - c0 + tracer_cpu) / conns,
                "tracer_cpu_pct": 100 * tracer_cpu / (t1 - t0), "seconds": t1 - t0}

    def _stopped(self) -> RuntimeError:
        return RuntimeError(f"the storm stopped (exit {self.proc.poll()}): {self.proc.stderr.read().strip()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()             # its workers die with it (PR_SET_PDEATHSIG)
        self.proc.wait(timeout=30)


class IdleConnections:
    """COUNT established, idle loopback connections held open in a netns by rststorm's hold mode
    (bounded by its own time limit, which also bounds the wait for its "ready")."""

    def __init__(self, ns: Netns, exe: str, port: int, count: int, max_seconds: float = 600):
        self.proc = subprocess.Popen(ns.argv(exe, "hold", str(port), str(count), str(max_seconds)),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.close()
            raise RuntimeError(f"rststorm hold {count} did not get ready: {line!r}")

    def close(self) -> None:
        try:
            self.proc.stdin.close()          # EOF on stdin: it closes everything and exits
            self.proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


# -- the tracers under test ----------------------------------------------------------------------
def bpftrace_program(ports: list[int]) -> str:
    """bpftrace printing the same events rsttrace reports for these ports (addresses, ports, state,
    kernel reason), filtered in the kernel like rsttrace's --port."""
    def any_port(a: str, b: str) -> str:
        return " || ".join(f"{a} == {p} || {b} == {p}" for p in ports)
    sport = "((args->saddr[2] << 8) | args->saddr[3])"
    dport = "((args->daddr[2] << 8) | args->daddr[3])"
    v4 = lambda f: f"args->{f}[4], args->{f}[5], args->{f}[6], args->{f}[7]"      # noqa: E731
    return (
        f"tracepoint:tcp:tcp_send_reset /{any_port(sport, dport)}/ {{ "
        f'printf("rst_sent %d.%d.%d.%d:%d > %d.%d.%d.%d:%d state %d reason %d\\n", '
        f"{v4('saddr')}, {sport}, {v4('daddr')}, {dport}, args->state, args->reason); }} "
        f"tracepoint:tcp:tcp_receive_reset /{any_port('args->sport', 'args->dport')}/ {{ "
        f'printf("rst_received %s:%d < %s:%d\\n", ntop(args->saddr), args->sport, ntop(args->daddr), args->dport); }}')


def kernel_headers() -> str | None:
    """A full kernel header tree for bcc (Debian's linux-headers-amd64): the arch package holds only
    the generated headers and the -common package the rest, so bcc's BCC_KERNEL_SOURCE needs both
    merged into one tree. Built once, as symlinks, under .bench-out/."""
    for arch_dir in sorted(glob.glob("/usr/src/linux-headers-*-amd64"), reverse=True):
        common = arch_dir[:-len("amd64")] + "common"
        if not os.path.isdir(common):
            continue
        tree = OUT / ("kheaders-" + os.path.basename(arch_dir)[len("linux-headers-"):])
        if not (tree / "include" / "linux" / "kconfig.h").exists():
            OUT.mkdir(exist_ok=True)
            subprocess.run(["rm", "-rf", str(tree)], check=True)
            tree.mkdir()
            subprocess.run(["cp", "-rs", f"{common}/.", f"{tree}/"], check=True)
            subprocess.run(["cp", "-rsf", f"{arch_dir}/.", f"{tree}/"], check=True)
        return str(tree)
    return None


_OTLP_RECEIVER: OtlpReceiver | None = None


def otlp_receiver() -> OtlpReceiver:
    """The receiver of every --otlp run: on loopback, counting what it gets (its CPU is this
    process's, not the tracer's)."""
    global _OTLP_RECEIVER
    if _OTLP_RECEIVER is None:
        _OTLP_RECEIVER = OtlpReceiver(keep=False)
    return _OTLP_RECEIVER


def tool_argv(tool: str, ports: list[int], output: str) -> tuple[list[str], dict | None]:
    """argv and environment of each tracer, writing its records to `output`."""
    port_arg = ",".join(map(str, ports))
    rsttrace = [str(RSTTRACE), "--json", "-o", output, "--port", port_arg]
    if tool == "rsttrace":
        return rsttrace, None
    if tool == "rsttrace_nostories":    # connections' stories off (bpf/story.bpf.c, its hooks)
        return rsttrace + ["--no-stories"], None
    if tool == "rsttrace_origins":      # origins' per-packet hooks on too (bpf/origin.bpf.c; off by default)
        return rsttrace + ["--origins"], None
    if tool == "rsttrace_stdlib_json":  # JSON by the standard library, as without orjson (tracer/sinks/jsonenc.py)
        return rsttrace, {**os.environ, "RSTTRACE_JSON": "stdlib"}
    if tool == "rsttrace_otlp":         # every record also sent over OTLP/HTTP (tracer/sinks/otlp.py)
        return rsttrace + ["--otlp", otlp_receiver().url], None
    if tool == "rsttrace_app_errors":   # failed syscalls and accept() calls (bpf/app.bpf.c, its syscall hooks)
        return rsttrace + ["--app-errors"], None
    if tool == "rsttrace_storm":        # the kernel aggregates from the first event on (tracer/storm.py)
        return rsttrace, {**os.environ, "RSTTRACE_STORM_HIGH_BYTES": "0"}
    if tool == "rsttrace_compiled":     # a boot's first start: an empty program cache (tracer/kernel/progcache.py)
        subprocess.run(["rm", "-rf", FIRST_START_CACHE], check=True)
        return rsttrace, {**os.environ, "RSTTRACE_PROGRAM_CACHE": FIRST_START_CACHE}
    if tool == "rsttrace_base":         # another checkout of rsttrace, the baseline of a change (BASE_ENV)
        base = os.environ[BASE_ENV]
        return ([str(REPO / ".venv" / "bin" / "python"), "-m", "tracer", *rsttrace[1:]],
                {**os.environ, "PYTHONPATH": base})
    if tool == "bpftrace":
        return ["bpftrace", "-e", bpftrace_program(ports)], None
    if tool == "empty":          # empty programs on the hooks rsttrace attaches by default; ports do not matter
        return ["/usr/bin/python3", str(BENCH / "empty_programs.py")], None
    if tool == "empty_origins":  # the same and the per-packet hooks of --origins (rsttrace --origins' floor)
        return ["/usr/bin/python3", str(BENCH / "empty_programs.py"), "--origins"], None
    if tool == "bcc":
        headers = kernel_headers()
        if headers is None:
            raise RuntimeError("no kernel headers: apt-get install linux-headers-amd64 (scripts/setup does)")
        return (["/usr/bin/python3", str(BENCH / "bcc_rst.py"), "--port", port_arg],
                {**os.environ, "BCC_KERNEL_SOURCE": headers})
    raise ValueError(tool)


READY_WORDS = {"rsttrace": "attached in", "rsttrace_compiled": "attached in", "rsttrace_storm": "attached in",
               "rsttrace_base": "attached in", "rsttrace_nostories": "attached in", "rsttrace_app_errors": "attached in",
               "rsttrace_origins": "attached in", "rsttrace_stdlib_json": "attached in",
               "rsttrace_otlp": "attached in", "bpftrace": "Attaching", "bcc": "Tracing TCP resets",
               "empty": "attached: empty programs", "empty_origins": "attached: empty programs"}


def peers_available() -> list[str]:
    """rsttrace and the peers this machine has (bcc needs the kernel header package)."""
    tools = ["rsttrace"]
    if os.environ.get(BASE_ENV):
        tools.append("rsttrace_base")
    if subprocess.run(["which", "bpftrace"], capture_output=True).returncode == 0:
        tools.append("bpftrace")
    if kernel_headers() is not None:
        tools.append("bcc")
    return tools


class Tracer:
    """One tracer as a whole process, as a user runs it: spawned, waited for until it says it is
    attached, its CPU time read from /proc/PID/stat, stopped with SIGINT, reaped with wait4 for its
    total CPU; peak RSS is VmHWM, read before it is stopped. Its records go to a file (rsttrace: -o;
    the peers: stdout), not to this process: a storm's output can be hundreds of MB. (The tests'
    Tracer runs `python -m tracer` and keeps its output in memory: right for checking records, not
    for timing a tracer.)"""

    def __init__(self, tool: str, ports: list[int], output: Path):
        self.tool = tool
        self.output = output
        output.unlink(missing_ok=True)
        argv, env = tool_argv(tool, ports, str(output))
        self.stderr: list[str] = []
        self._ready = threading.Event()
        self.start = time.monotonic()
        # The peers print to stdout: through a pipe, copied to the file by a thread here, so that
        # bpftrace's "Attaching" is seen when it is written, not when a file buffer is flushed.
        # SIGINT back to its default in the child: a benchmark started in the background by a shell
        # (`scripts/bench/run &`) has it ignored, and the tracers would inherit that and never stop
        # on the SIGINT that stop() sends.
        ours = tool.startswith("rsttrace")      # rsttrace writes its own file (-o)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL if ours else subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.rusage = None
        self._copier = None
        if not ours:
            self._copier = threading.Thread(target=self._copy_stdout, daemon=True)
            self._copier.start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _copy_stdout(self) -> None:
        word = READY_WORDS[self.tool].encode()
        with open(self.output, "wb") as f:
            while chunk := self.proc.stdout.read1(65536):
                f.write(chunk)
                if not self._ready.is_set() and word in chunk:
                    self._ready.set()

    def _read_stderr(self) -> None:
        word = READY_WORDS[self.tool].encode()
        for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace").rstrip())
            if word in line:
                self._ready.set()

    def wait_ready(self, timeout: float = 60) -> float:
        """Seconds from spawn to "attached"."""
        deadline = self.start + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.01):
                return time.monotonic() - self.start
            if self.exited():
                break
        self.kill()
        raise RuntimeError(f"{self.tool} did not attach: {' | '.join(self.stderr[-5:])}")

    def exited(self) -> bool:
        """Whether the process has ended, without reaping it (wait4 in stop() wants its rusage)."""
        if self.rusage is not None:
            return True
        info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return info is not None

    def status(self, field: str) -> float | None:
        """A size field of /proc/PID/status (VmHWM, ...) in MB."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def settle(self, timeout: float = 60, quiet: float = 1.0) -> float:
        """Wait until the tracer has caught up: no new event in its output and (almost) no CPU for
        `quiet` seconds. Returns the seconds waited (the tracer's lag behind the storm). Records that
        are not events do not count: rsttrace writes a `listeners` record every few seconds, which
        would read as lag."""
        start = time.monotonic()
        size, cpu, since = 0, self.cpu(), time.monotonic()
        while time.monotonic() - start < timeout:
            time.sleep(0.2)
            now_size = self.output.stat().st_size if self.output.exists() else 0
            now_cpu = self.cpu()
            if self._events_between(size, now_size) or now_cpu - cpu > 0.05 * (time.monotonic() - since) + 0.02:
                size, cpu, since = now_size, now_cpu, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return since - start
            size = now_size
        return time.monotonic() - start

    def _events_between(self, start: int, end: int) -> bool:
        """Whether the output's bytes [start, end) hold an event (more than 64 KiB: surely)."""
        if end - start > 65536 or end <= start:
            return end > start
        with open(self.output, "rb") as f:
            f.seek(max(0, start - len(self.event_word)))
            return self.event_word in (b"\n" if start == 0 else b"") + f.read(end - f.tell())

    @property
    def event_word(self) -> bytes:
        """What starts or marks an event in the output (results() counts them)."""
        return b'"type":"event"' if self.tool.startswith("rsttrace") else b"\nrst_"

    def stop(self, timeout: float = 90) -> None:
        """SIGINT, then reap with wait4 (total CPU of the process). For the peers SIGINT is
        repeated every 2 s: bpftrace loses one that comes while it attaches (right after it says
        "Attaching"). rsttrace gets one, as a user's Ctrl-C: it may take long to drain a backlog."""
        deadline = time.monotonic() + timeout
        next_int = 0.0
        while self.rusage is None:
            pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.rusage = rusage
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                if self._copier:
                    self._copier.join(10)
                break
            now = time.monotonic()
            if now > deadline:
                os.kill(self.proc.pid, signal.SIGKILL)
                deadline = now + 10
            elif now >= next_int:   # os.kill: Popen.send_signal() would reap it first (poll)
                os.kill(self.proc.pid, signal.SIGINT)
                next_int = now + 2.0 if not self.tool.startswith("rsttrace") else deadline
            time.sleep(0.02)

    def kill(self) -> None:
        if not self.exited():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.stop(timeout=10)

    @property
    def cpu_total(self) -> float:
        return self.rusage.ru_utime + self.rusage.ru_stime

    def results(self) -> dict:
        """Events written and events lost, from the tracer's own output (read in chunks: a storm's
        output can be hundreds of MB, and this process's size would leak into the next child's)."""
        events = lost = 0
        last = b""
        word = self.event_word
        tail = b"\n"           # peers: a line starts after a newline; the file starts a line too
        if self.output.exists():
            with open(self.output, "rb") as f:
                while chunk := f.read(1 << 20):
                    data = tail + chunk
                    events += data.count(word)
                    tail = data[-(len(word) - 1):]
                    last = (last + chunk)[-(1 << 16):]
        if self.tool.startswith("rsttrace"):
            lost = aggregated = None
            for line in last.splitlines()[::-1]:
                if b'"type":"summary"' in line:
                    summary = json.loads(line)
                    lost, aggregated = summary["lost"], summary.get("aggregated", 0)
                    break
            return {"events": events, "lost": lost, "aggregated": aggregated}
        # "Lost N events": bpftrace and bcc_rst.py print the perf buffer's own count (bpftrace on
        # stdout, where it may come more than once)
        with open(self.output, "rb") as f:
            for line in f:
                if line.startswith(b"Lost "):
                    lost += int(line.split()[1])
        lost += sum(int(x.split()[1]) for x in self.stderr if x.startswith("Lost "))
        return {"events": events, "lost": lost}


# -- one measured run ----------------------------------------------------------------------------
STEADY_S = 1.0      # after "attached", before the storm: start-up work (first samples) is not counted


def storm_run(*args, **kwargs) -> dict:
    """_storm_run, once more if the tracer died on its own (a stray signal on a shared machine): a
    second death is reported in the result (rc)."""
    run = _storm_run(*args, **kwargs)
    if run.get("rc", 0) != 0:
        log("  (the tracer died: that run is repeated)")
        run = _storm_run(*args, **kwargs)
    return run


def _storm_run(exe: str, mode: str, seconds: float, rate: float = 0, tool: str | None = None,
               ports: list[int] | None = None, idle: int = 0) -> dict:
    """One storm in a fresh netns, with `tool` attached (or none). For a tracer: what it wrote, lost,
    its CPU seconds from storm start to exit (drain included), its peak RSS, and how far it lagged.
    mode "idle": no storm, `seconds` of nothing (what the tracer costs while attached)."""
    with Netns() as ns:
        holder = IdleConnections(ns, exe, IDLE_PORT, idle) if idle else None
        tracer = None
        try:
            if tool:
                tracer = Tracer(tool, ports or [STORM_PORT], OUT / f"run-{tool}.out")
                ready = tracer.wait_ready()
                time.sleep(STEADY_S)
                cpu0 = tracer.cpu()
            before = ns.counters()
            if mode == "idle":
                time.sleep(seconds)
                storm = {"ops": 0, "errors": 0, "seconds": seconds, "cpu_s": 0.0}
            else:
                storm = ns.storm(exe, mode, STORM_PORT, seconds, rate=rate)
            after = ns.counters()
            cpu_window = tracer.cpu() - cpu0 if tracer else None
            run = {"ops": storm["ops"], "errors": storm["errors"], "seconds": storm["seconds"],
                   "ops_per_s": storm["ops"] / storm["seconds"], "storm_cpu_s": storm["cpu_s"],
                   "kernel_rsts_sent": after["TcpOutRsts"] - before["TcpOutRsts"]}
            # every reset-storm op ends in exactly one RST received (ECONNREFUSED, or the reset read)
            run["kernel_events"] = run["kernel_rsts_sent"] + (storm["ops"] if mode not in ("conn", "idle") else 0)
            # CPU per storm op, the storm's and the tracer's together: unlike the rate, it holds still
            # when other work on the machine takes CPU away from the storm
            if storm["ops"]:
                run["cpu_us_per_op"] = 1e6 * (storm["cpu_s"] + (cpu_window or 0)) / storm["ops"]
            if tracer:
                run["lag_s"] = tracer.settle()
                hwm = tracer.status("VmHWM")     # per process image (wait4's maxrss counts the parent before exec)
                tracer.stop()
                run["rc"] = tracer.proc.returncode
                if run["rc"] != 0:
                    log(f"  {tool} exited {run['rc']}: {' | '.join(tracer.stderr[-3:])}")
                run.update(tracer.results())
                run.update({"ready_s": ready, "cpu_s": tracer.cpu_total - cpu0, "cpu_window_s": cpu_window,
                            "maxrss_mb": hwm})
                run["events_per_s"] = run["events"] / storm["seconds"]
                run["made_per_s"] = run["kernel_events"] / storm["seconds"]
                if run.get("aggregated") is not None:
                    run["aggregated_per_s"] = run["aggregated"] / storm["seconds"]
                # the tracer's CPU while the storm ran, in cores (1.0: one core busy all along)
                run["cores"] = cpu_window / storm["seconds"] if cpu_window is not None else None
                run["cpu_ms_per_1k_events"] = (1e6 * run["cpu_s"] / run["events"]) if run["events"] else None
        finally:
            if tracer:
                tracer.kill()
            if holder:
                holder.close()
    return run


# -- overhead in windows of one storm ------------------------------------------------------------
WARMUP_S = 2.0      # the storm's first seconds (TIME_WAIT filling up) are not measured
GAP_S = 0.5         # after a tracer exits, before a no-tracer window


def windowed_overhead(exe: str, conds: dict[str, dict], runs: int, seconds: float, idle: int = 0) -> dict:
    """The rate a conn storm loses to each tracer (scripts/bench/overhead, scaling). `conds`:
    condition name → {"tool", "ports"}; "no_tracer" (the baseline) and "no_tracer_again" (A/A, from
    the baseline windows) have no tool. One storm through the whole measurement, in windows of
    `seconds`: a no-tracer window, then a traced one, in turn, `runs` cycles over the traced
    conditions (each cycle in another order). A traced window's rate loss is taken against the mean
    of the no-tracer windows either side of it; the A/A control takes each inner no-tracer window
    against the two no-tracer windows nearest to it (as far away in time as a traced window's
    baselines, or further). A tracer is started before its window (ready, then STEADY_S) and stopped
    after it, outside every window. loss_pct is taken from the windows' fast rates (SUB_S),
    loss_whole_window_pct from their mean rates. `idle`: that many idle established connections held
    in the storm's netns through every window."""
    traced = [c for c in conds if c not in ("no_tracer", "no_tracer_again")]
    sequence = []
    for i in range(runs):
        for name in traced[i % len(traced):] + traced[:i % len(traced)]:
            sequence += ["no_tracer", name]
    sequence.append("no_tracer")
    # the storm's own time limit: past every window and every tracer's start and stop, however slow
    # (it is killed when the measurement ends)
    budget = len(sequence) * seconds + (len(sequence) // 2) * 30 + 60
    if budget > MAX_STORM_S:
        raise SystemExit(f"{runs} runs of {seconds:g} s windows over {len(traced)} conditions could take "
                         f"{budget:.0f} s; the storm is bounded to {MAX_STORM_S} s: use fewer runs or shorter windows")
    windows: list[tuple[str, dict]] = []
    with Netns() as ns:
        holder = IdleConnections(ns, exe, IDLE_PORT, idle) if idle else None
        storm = LongStorm(ns, exe, budget)
        try:
            time.sleep(WARMUP_S)
            for name in sequence:
                spec = conds[name]
                if not spec.get("tool"):
                    time.sleep(GAP_S)         # the last tracer's exit and detach are behind us
                    windows.append((name, storm.window(seconds)))
                    continue
                tracer = Tracer(spec["tool"], spec["ports"], OUT / f"run-{spec['tool']}.out")
                try:
                    tracer.wait_ready()
                    time.sleep(STEADY_S)
                    windows.append((name, storm.window(seconds, tracer)))
                finally:
                    tracer.stop()
                w = windows[-1][1]
                log(f"  {len(windows):3d} {name}: {w['fast_conns_per_s']:.0f}/s fast ({w['conns_per_s']:.0f}/s mean) "
                    f"{w['cpu_us_per_conn']:.1f} µs, against {windows[-2][1]['fast_conns_per_s']:.0f}/s before")
        finally:
            storm.stop()
            if holder:
                holder.close()

    def loss(i: int, j: int, k: int, key: str) -> float:
        base = (windows[j][1][key] + windows[k][1][key]) / 2
        return 100 * (1 - windows[i][1][key] / base)

    fast: dict[str, list[float]] = {c: [] for c in ["no_tracer_again", *traced]}
    whole: dict[str, list[float]] = {c: [] for c in fast}
    extra_cost: dict[str, list[float]] = {c: [] for c in fast}
    cpu: dict[str, list[float]] = {c: [] for c in fast}
    for i, (name, w) in enumerate(windows):
        if name == "no_tracer":
            if not 2 <= i <= len(windows) - 3:
                continue
            before, after, name = i - 2, i + 2, "no_tracer_again"
        else:
            before, after = i - 1, i + 1
            cpu[name].append(w["tracer_cpu_pct"])
        fast[name].append(loss(i, before, after, "fast_conns_per_s"))
        whole[name].append(loss(i, before, after, "conns_per_s"))
        extra_cost[name].append(-loss(i, before, after, "cpu_us_per_conn"))
    rates = {c: [w["conns_per_s"] for n, w in windows if n == c] for c in ["no_tracer", *traced]}
    cost = {c: [w["cpu_us_per_conn"] for n, w in windows if n == c] for c in ["no_tracer", *traced]}
    return {"method": "windows of one storm, each traced window against the no-tracer windows either side; "
                      "rate loss from each window's fast rate (90th percentile of its quarter-second rates)",
            "windows": [{"condition": n, **w} for n, w in windows],
            "conns_per_s": {c: summary(v) for c, v in rates.items()},
            "cpu_us_per_conn": {c: summary(v) for c, v in cost.items()},
            "loss_pct": {c: summary(v) for c, v in fast.items()},
            "loss_mean_pct": {c: mean_ci(v) for c, v in fast.items()},
            "loss_whole_window_pct": {c: summary(v) for c, v in whole.items()},
            "cpu_cost_pct": {c: summary(v) for c, v in extra_cost.items()},
            "tracer_cpu_pct": {c: summary(v) for c, v in cpu.items()}}


# -- BPF run time per connection (the kernel's own accounting) ----------------------------------
BPF_ENABLE_STATS = 32       # bpf(2) command (Linux 5.8+), attr: {u32 type}; BPF_STATS_RUN_TIME = 0
SYS_BPF = 321               # x86-64


def enable_stats() -> int:
    """Run-time statistics on while the returned fd is open (the kernel.bpf_stats_enabled sysctl is
    not touched)."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 4)(0)
    fd = libc.syscall(SYS_BPF, BPF_ENABLE_STATS, attr, ctypes.sizeof(attr))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "bpf(BPF_ENABLE_STATS)")
    return fd


def program_times(ids: set[int]) -> dict[int, tuple[str, int, int]]:
    """id → (name, run_time_ns, run_cnt) of these programs."""
    progs = json.loads(subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True).stdout or "[]")
    return {p["id"]: (p.get("name", "?"), p.get("run_time_ns", 0), p.get("run_cnt", 0)) for p in progs
            if p["id"] in ids}


HOOK_NAMES = ("inet_sock_set_state", "consume_skb", "netif_receive_skb", "kfree_skb", "sk_data_ready",
              "sock_recv_length", "tcp__tcp_send_reset", "tcp__tcp_receive_reset", "tcp__tcp_retransmit_skb",
              "tcp__tcp_retransmit_synack", "net_dev_queue", "icmp_send")


def hook_of(name: str, prog_id: int, tracepoints: dict[int, str]) -> str:
    """The hook a program runs on, from its name. Programs loaded without BTF (rsttrace's cached
    ones, its tp_btf one) have the kernel's 15-character name: the hook it is the start of, or where
    two hooks start alike (tcp__tcp_retran...) the one its perf event is attached to (`tracepoints`:
    program id → tracepoint, from tracepoint_of())."""
    hook = name.replace("raw_tracepoint__", "").replace("tracepoint__", "")
    known = [h for h in HOOK_NAMES if h.startswith(hook)]
    if len(known) > 1:
        known = [h for h in known if h.endswith("_" + tracepoints.get(prog_id, "?"))]
    if len(known) == 1:
        return known[0]
    # not one of HOOK_NAMES (--app-errors' syscalls:sys_exit_* programs): its perf event's tracepoint
    return tracepoints.get(prog_id) or hook


def tracepoint_of(pid: int) -> dict[int, str]:
    """Program id → the tracepoint it is attached to through a perf event of process `pid`."""
    out = subprocess.run(["bpftool", "perf", "show", "-j"], capture_output=True, text=True, timeout=30).stdout
    return {p["prog_id"]: p.get("tracepoint", "") for p in json.loads(out or "[]") if p.get("pid") == pid}


def hook_runs(tool: str, before: dict, after: dict, tracepoints: dict[int, str]) -> dict[str, tuple[int, int]]:
    """hook → (runs, ns run) of `tool`'s programs between two program_times() (programs that did not
    run are left out)."""
    hooks = {}
    for pid, (name, ns_run, count) in after.items():
        ns0, count0 = before.get(pid, (name, 0, 0))[1:]
        if count > count0:
            hook = hook_of(name, pid, tracepoints)
            if hook in hooks:
                raise RuntimeError(f"{tool} has two programs on {hook}")
            hooks[hook] = (count - count0, ns_run - ns0)
    return hooks


def bpf_run_time(exe: str, tool: str, ports: list[int], seconds: float, listen_on: int | None = None,
                 idle: int = 0) -> dict:
    """Nanoseconds the tracer's programs ran per connection of a conn storm on STORM_PORT (run_time_ns /
    run_cnt over the storm), with `tool` attached for `ports`. `listen_on`: an idle listener on that
    port (the tests' burst.py server, never accepting), started before the tracer, which finds it as
    a listener that predates it. `idle`: that many idle established connections held through the storm."""
    with Netns() as ns:
        listener = Background(ns, "server", "127.0.0.1", str(listen_on), "16", "600") if listen_on else None
        holder = IdleConnections(ns, exe, IDLE_PORT, idle) if idle else None
        try:
            tracer = Tracer(tool, ports, OUT / f"run-{tool}.out")
            try:
                tracer.wait_ready()
                time.sleep(STEADY_S)
                ids = prog_ids_of(tracer.proc.pid)
                tracepoints = tracepoint_of(tracer.proc.pid)
                fd = enable_stats()
                try:
                    before = program_times(ids)
                    storm = ns.storm(exe, "conn", STORM_PORT, seconds)
                    after = program_times(ids)
                finally:
                    os.close(fd)
            finally:
                tracer.stop()
        finally:
            if listener:
                listener.stop()
            if holder:
                holder.close()
    hooks = {hook: {"runs_per_conn": runs / storm["ops"], "ns_per_run": ns_run / runs}
             for hook, (runs, ns_run) in hook_runs(tool, before, after, tracepoints).items()}
    total = sum(h["runs_per_conn"] * h["ns_per_run"] for h in hooks.values())
    cpu_ns_per_conn = 1e9 * storm["cpu_s"] / storm["ops"]
    return {"ns_per_conn": total, "cpu_us_per_conn": cpu_ns_per_conn / 1e3, "share_pct": 100 * total / cpu_ns_per_conn,
            "hooks": hooks, "storm": storm}
