"""The live screen in a real terminal: rsttrace runs inside tmux (a real pty of a fixed size), real
resets happen in a private netns, and the test reads the screen with `tmux capture-pane` as a person
would see it. Ctrl-C must give the terminal back (no alternate screen, cursor shown), print the final
summary and exit 0, leaving no BPF program behind. Piped, the same run prints plain lines."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO

BURST = REPO / "scripts" / "repro" / "burst.py"

# A port of its own: screen counts cover every netns, so a run of another suite on the host (8100)
# must not show up in them.
PORT = 20000 + os.getpid() % 10000
WIDTH, HEIGHT = 160, 45


class Tmux:
    """One private tmux server (its own socket, so nothing else's sessions are touched)."""

    def __init__(self):
        self.socket = f"rsttrace-test-{uuid.uuid4().hex[:8]}"

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout

    def start(self, command: str) -> None:
        self.tmux("new-session", "-d", "-s", "main", "-x", str(WIDTH), "-y", str(HEIGHT), "-c", str(REPO), command)
        self.socket_path = self.display("#{socket_path}")

    def screen(self, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", "-t", "main", *(["-e"] if escapes else []))

    def display(self, fmt: str) -> str:
        return self.tmux("display-message", "-p", "-t", "main", fmt).strip()

    def wait_for(self, check, what: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if check(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed {what}; it shows:\n{text}")
            time.sleep(0.2)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)
        if getattr(self, "socket_path", None):          # tmux leaves its socket file behind
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass


@pytest.fixture
def tmux(root):
    t = Tmux()
    yield t
    t.kill()


def child_of(pid: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
        if kids:
            return int(kids[0])
        time.sleep(0.05)
    raise AssertionError(f"no child process under the pane's shell {pid}")


def bpf_prog_ids_held_by(pid: int) -> set[int]:
    """BPF programs this process holds: prog_id of its bpf-prog file descriptors."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                m = re.search(r"^prog_id:\s+(\d+)", f.read(), re.M)
        except OSError:
            continue
        if m:
            ids.add(int(m.group(1)))
    return ids


def loaded_bpf_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True, check=True)
    return {p["id"] for p in json.loads(out.stdout or "[]")}


def reason_count(screen: str, reason: str, event: str) -> int | None:
    m = re.search(rf"[✖▲·]\s+{reason}\s+{event}\s+(\d+)\s", screen)
    return int(m.group(1)) if m else None


def is_red(line: str) -> bool:
    for m in re.finditer(r"\x1b\[([0-9;]*)m", line):
        params = m.group(1).split(";")
        if "31" in params or "91" in params or params[:3] in (["38", "5", "1"], ["38", "5", "9"]):
            return True
    return False


def start_rsttrace(tmux: Tmux) -> set[int]:
    """rsttrace on the terminal, as a person starts it; returns the ids of the BPF programs it holds."""
    tmux.start(f"env -u NO_COLOR -u COLUMNS -u LINES {sys.executable} -m tracer --port {PORT}; "
               "echo EXIT=$?; sleep 600")
    tmux.wait_for(lambda s: "latest events" in s and "attached in" in s, "the live screen")
    ours = bpf_prog_ids_held_by(child_of(int(tmux.display("#{pane_pid}"))))
    assert len(ours) >= 2, "rsttrace holds no BPF programs?"
    assert tmux.display("#{alternate_on}") == "1"          # the screen lives on the alternate screen
    return ours


def stop_with_ctrl_c(tmux: Tmux, ours: set[int]) -> str:
    tmux.tmux("send-keys", "-t", "main", "C-c")
    final = tmux.wait_for(lambda s: "EXIT=" in s, "rsttrace exiting", timeout=60)
    assert "EXIT=0" in final
    assert tmux.display("#{alternate_on}") == "0" and tmux.display("#{cursor_flag}") == "1"   # terminal restored
    assert "latest events" not in final                            # the live screen is gone, not left behind
    assert not (loaded_bpf_prog_ids() & ours), "BPF programs left in the kernel after Ctrl-C"
    return final


def test_proxy_abort_and_refused_connect_on_the_live_screen_then_ctrl_c_summary(netns, tmux):
    # The first seed incident in miniature (a server closing with 1000 unread bytes: what nginx does to
    # its upstream when it cannot buffer a response) plus a connect to a closed port, seen on the screen.
    ours = start_rsttrace(tmux)

    before = netns.counters()
    unread = netns.scenario("unread_close", "127.0.0.1", PORT, "1000")
    refused = netns.scenario("closed_port", "127.0.0.1", PORT)
    after = netns.counters()
    assert unread["client_error"] == "ECONNRESET" and refused["error"] == "ECONNREFUSED"
    assert after["TcpOutRsts"] - before["TcpOutRsts"] == 2          # the kernel sent exactly these two RSTs

    screen = tmux.wait_for(lambda s: reason_count(s, "peer_reset", "rst_received") == 2
                           and reason_count(s, "no_listener", "rst_sent") == 1, "every reset counted")
    # Per-reason rows: counts, worst first, the catalog's explanation.
    assert reason_count(screen, "closed_with_unread_data", "rst_sent") == 1
    rows = [ln for ln in screen.splitlines() if re.search(r"[✖▲·]\s+\w+\s+rst_", ln)]
    assert [re.search(r"[✖▲·]\s+(\w+)", ln).group(1) for ln in rows] == [
        "closed_with_unread_data", "peer_reset", "no_listener"]
    assert "closed with unread data: Read the closing application's error log" in rows[0]
    # Event rows: who reset whom, why, with the process and the unread bytes.
    assert re.search(rf"rst_sent\s+closed_with_unread_data\s+127\.0\.0\.1:{PORT}\s+→\s+127\.0\.0\.1:"
                     rf"{unread['client_port']}\s+CLOSE\s+{netns.name}\s+python3/{unread['server_pid']}\s+unread 1000",
                     screen), screen
    assert re.search(rf"rst_received\s+peer_reset\s+127\.0\.0\.1:{unread['client_port']}\s+←\s+127\.0\.0\.1:{PORT}"
                     rf"\s+ESTABLISHED\s+{netns.name}\s+python3/{unread['client_pid']}", screen), screen
    assert re.search(rf"rst_sent\s+no_listener\s+127\.0\.0\.1:{PORT}\s+→\s+127\.0\.0\.1:{refused['client_port']}"
                     rf"\s+-\s+{netns.name}\s+-", screen), screen
    assert "no listener data" in screen
    assert f"filters: ports {PORT}" in screen and "hooks: rst_sent tracepoint:tcp:tcp_send_reset" in screen
    # Severity colours come from the catalog: the abort is an error (red), on the reason and event rows.
    red = [ln for ln in tmux.screen(escapes=True).splitlines() if "closed_with_unread_data" in ln]
    assert len(red) == 2 and all(is_red(ln) for ln in red)

    final = stop_with_ctrl_c(tmux, ours)
    assert re.search(r"rsttrace: 4 events in [\d.]+s, lost 0", final), final
    top = final[final.index("Top reasons"):final.index("Top listeners")]
    assert re.search(r"1\s+✖ closed_with_unread_data\s+rst_sent\s+closed with unread data", top)
    assert re.search(r"2\s+▲ peer_reset\s+rst_received", top) and re.search(r"1\s+▲ no_listener\s+rst_sent", top)
    assert f"local endpoints that reset or dropped most: 127.0.0.1:{PORT} (2)" in final
    advice = " ".join(final[final.index("Advice"):].split())
    assert "closed_with_unread_data: Read the closing application's error log" in advice
    assert "rsttrace's programs counted 4 events in the kernel, 4 were delivered, 0 lost" in advice


def test_accept_queue_burst_fills_the_listener_gauge_on_the_live_screen(netns, tmux):
    # The second seed incident: a server that listens with backlog 5 and never accepts, 60 clients at once.
    ours = start_rsttrace(tmux)
    server = subprocess.Popen(["ip", "netns", "exec", netns.name, "/usr/bin/python3", str(BURST), "server",
                               "127.0.0.1", str(PORT), "5", "60"], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = json.loads(server.stdout.readline())["server_pid"]
        before = netns.counters()
        clients = json.loads(netns.run("/usr/bin/python3", str(BURST), "clients", "127.0.0.1", str(PORT), "60",
                                       "3").stdout)
        after = netns.counters()
        overflows = after["TcpExtListenOverflows"] - before["TcpExtListenOverflows"]
        assert overflows > 0 and clients["outcome"]["connected"] == 6     # 5 + 1: the kernel's "> backlog" test

        gauge = re.compile(rf"127\.0\.0\.1:{PORT}\s+{netns.name}\s+python3/{server_pid}\s+█{{16}} 6/5 FULL\s+"
                           r"5 = backlog \(somaxconn 4096\)")
        gave_up = clients["outcome"]["pending"]           # still connecting when the clients closed
        screen = tmux.wait_for(lambda s: gauge.search(s) is not None
                               and reason_count(s, "accept_queue_full", "syn_dropped") == overflows
                               and reason_count(s, "never_established", "connection") == gave_up > 0,
                               f"the full accept queue, {overflows} drops (TcpExtListenOverflows) and "
                               f"{gave_up} connections never established")
        assert re.search(rf"connection\s+never_established\s+127\.0\.0\.1:\d+\s+→\s+127\.0\.0\.1:{PORT}\s+-\s+"
                         rf"python3/\d+\s+\d SYN drops \d SYN retx gave up", screen), screen
        assert re.search(rf"syn_dropped\s+accept_queue_full\s+127\.0\.0\.1:{PORT}\s+↔\s+127\.0\.0\.1:\d+\s+"
                         rf"LISTEN\s+{netns.name}\s+python3/{server_pid}\s+accept q 6/5", screen), screen
        red = [ln for ln in tmux.screen(escapes=True).splitlines() if "6/5 FULL" in ln]
        assert red and all(is_red(ln) for ln in red)
        final = stop_with_ctrl_c(tmux, ours)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert re.search(rf"{overflows}\s+✖ accept_queue_full\s+syn_dropped\s+accept queue full", final), final
    flat = " ".join(final.split())
    assert (f"127.0.0.1:{PORT} (netns {netns.name}) python3/{server_pid}: accept queue peak 6/5" in flat)
    assert (f"127.0.0.1:{PORT} (netns {netns.name}): the accept queue is capped by the listen() backlog (5); "
            "raise it in the server (somaxconn is 4096)") in flat
    # rsttrace saw every drop the kernel counted in that netns.
    assert f"netns {netns.name}: coverage listen_drops 100%" in flat
    # and what the drops did to the clients: the stories of those that gave up, per listener
    assert f"connections hurt: {gave_up} never established" in flat, flat


def test_piped_output_is_plain_lines_without_escape_codes(netns, tracer):
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["TERM"] = "xterm-256color"
    t = tracer("--port", str(PORT), validate=False, env=env)
    unread = netns.scenario("unread_close", "127.0.0.1", PORT, "1000")
    refused = netns.scenario("closed_port", "127.0.0.1", PORT)
    t.stop()
    assert t.returncode == 0
    assert "\x1b" not in t.stdout and not any("\x1b" in ln for ln in t.stderr_lines)
    lines = [ln for ln in t.stdout.splitlines() if f"netns={netns.name} " in ln]
    assert len(lines) == 4
    assert any(re.search(rf"rst_sent\s+closed_with_unread_data \[TCP_ABORT_ON_CLOSE\] 127\.0\.0\.1:{PORT} > "
                         rf"127\.0\.0\.1:{unread['client_port']} CLOSE netns={netns.name} "
                         rf"python3/{unread['server_pid']} unread=1000 \| ", ln) for ln in lines), lines
    assert any(f"no_listener [NO_SOCKET] 127.0.0.1:{PORT} > 127.0.0.1:{refused['client_port']}" in ln
               for ln in lines), lines
    assert any(ln.startswith("rsttrace: 4 events in") for ln in t.stderr_lines), t.stderr_lines


def test_closing_the_terminal_stops_rsttrace_and_detaches_everything(tmux):
    # An SSH session that drops: the terminal hangs up (SIGHUP). On a terminal that means stop —
    # not "reopen the outputs", which is what SIGHUP means to a service writing a file.
    ours = start_rsttrace(tmux)
    pid = child_of(int(tmux.display("#{pane_pid}")))
    tmux.kill()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "Z":
                break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] == "Z"
    assert not (loaded_bpf_prog_ids() & ours), "BPF programs left in the kernel after the terminal closed"
