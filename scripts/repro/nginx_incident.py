"""The proxy that reset its upstream, reproduced with a real nginx (run it inside a private netns).

The incident: downloads over a few hundred KB failed through nginx; the upstream logged "Connection
reset by peer" / "broken pipe". nginx ran as a changed `user` that could not write its proxy temp
directory, so whenever a response outgrew the in-memory proxy buffers, the worker failed to open a
temp file (Permission denied) and closed the upstream connection with the rest of the response still
unread in the socket: the kernel answers such a close with RST (TCP_ABORT_ON_CLOSE).

Here: an upstream HTTP server (its own process, comm `upstream`) serves /small (16 KB) and /big (2 MB);
nginx (Debian package, its own prefix, config and pid file under a temp dir — never /etc/nginx, the
system service or port 80) proxies to it with small proxy buffers, `user nobody` workers, and
proxy_temp_path under a root-only (0700) directory. nginx's master "repairs" an unwritable temp dir
at start-up (mkdir + chown to the worker user), so the parent is what keeps the worker out — as with a
wrong owner on /var/cache/nginx. Every wait is bounded; one JSON line of facts is printed.

    python3 nginx_incident.py incident [ADDR] [PROXY_PORT] [UPSTREAM_PORT] [SMALL] [BIG]
        start upstream and nginx, download /small SMALL times then /big BIG times (defaults 2, 2),
        stop everything; facts: pids (master, worker, upstream), worker uid, each download's outcome and
        CLOCK_MONOTONIC window, nginx error.log lines and the upstream's own log.
    python3 nginx_incident.py upstream ADDR PORT           the upstream server alone (used by `incident`)
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

SMALL = 16 * 1024            # fits nginx's in-memory proxy buffers: never touches the temp dir
BIG = 2 * 1024 * 1024        # the 2 MB download of the incident
WORKER_USER, WORKER_GROUP = "nobody", "nogroup"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

CONF = """\
# rsttrace's nginx incident: proxy buffers too small for the response, and a proxy temp dir the
# workers cannot reach (its parent {prefix}/locked is root-only).
user {user} {group};
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/logs/access.log;
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/locked/proxy_temp;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        # A small send buffer towards the client stands for a slow client link: on loopback the
        # kernel would otherwise grow it to megabytes and hold the whole response for nginx.
        listen {listen} sndbuf=32k;
        location / {{
            proxy_pass http://{upstream};
            proxy_buffering on;           # the default: buffer the upstream's response ...
            proxy_buffer_size 4k;         # ... in 4 x 4k of memory, then in temp files
            proxy_buffers 4 4k;
            proxy_busy_buffers_size 8k;
        }}
    }}
}}
"""


def family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


# -- the upstream (the "Spring" side) -------------------------------------------------------------

def serve_upstream(addr: str, port: int) -> None:
    """Single-threaded HTTP/1.0 server; logs a reset like the JVM did ("Connection reset by peer")."""
    libc = ctypes.CDLL(None)
    libc.prctl(15, b"upstream", 0, 0, 0)      # PR_SET_NAME: comm `upstream`, easy to tell from nginx
    bodies = {"/small": b"s" * SMALL, "/big": b"b" * BIG}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = bodies.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            # Stream the body as an application server does (from storage, chunk by chunk): what the
            # proxy has not read yet waits here, in a socket buffer of ordinary size.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            try:
                self.wfile.write(body)
                outcome = "sent"
            except OSError as exc:
                outcome = f"{type(exc).__name__}: {exc.strerror}"
            print(json.dumps({"path": self.path, "outcome": outcome}), file=sys.stderr, flush=True)

        def log_message(self, *args):
            pass

    class Server(HTTPServer):
        address_family = family(addr)

    srv = Server((addr, port), Handler)
    print(json.dumps({"upstream_pid": os.getpid()}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv.timeout = 0.5
    deadline = time.monotonic() + 120           # bounded even if nobody stops it
    while time.monotonic() < deadline:
        srv.handle_request()
    srv.server_close()


# -- nginx --------------------------------------------------------------------------------------

def make_prefix(addr: str, proxy_port: int, upstream_port: int) -> str:
    prefix = tempfile.mkdtemp(prefix="rsttrace-nginx-")
    os.chmod(prefix, 0o755)                      # workers may reach tmp/ ...
    for d in ("conf", "logs", "tmp"):
        os.mkdir(os.path.join(prefix, d))
    os.mkdir(os.path.join(prefix, "locked"), 0o700)   # ... but not locked/, root's only: the incident
    with open(os.path.join(prefix, "conf", "nginx.conf"), "w") as f:
        f.write(CONF.format(prefix=prefix, user=WORKER_USER, group=WORKER_GROUP,
                            listen=hostport(addr, proxy_port), upstream=hostport(addr, upstream_port)))
    return prefix


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("PPid:") and int(line.split()[1]) == pid:
                out.append(int(entry))
    return out


def uid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def listening(port: int) -> bool:
    """Someone listens on `port` in this netns (read from /proc: a probing connect() would itself
    be answered with RST while nobody listens, and spoil the incident's counts)."""
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{name}") as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        if any(len(r) > 3 and r[3] == "0A" and int(r[1].rsplit(":", 1)[1], 16) == port for r in rows):
            return True
    return False


def wait_listening(port: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not listening(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port} after {seconds}s")
        time.sleep(0.02)


def download(addr: str, port: int, path: str, slow: float = 0.2) -> dict:
    """One HTTP/1.0 GET through the proxy by a client that is slower than the upstream (a browser on a
    real network): nginx must hold what the client has not taken yet — first in memory, then on disk."""
    start = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.settimeout(10)
    status, expected, body, error = None, None, 0, None
    try:
        s.connect((addr, port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: incident\r\n\r\n".encode())
        time.sleep(slow)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else None
        for line in lines[1:]:
            if line.lower().startswith("content-length:"):
                expected = int(line.split(":", 1)[1])
        body = len(rest)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += len(chunk)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc.strerror or exc}"
    finally:
        s.close()
    return {"path": path, "status": status, "content_length": expected, "received": body,
            "complete": error is None and expected is not None and body == expected, "error": error,
            "start_ns": start, "end_ns": time.clock_gettime_ns(time.CLOCK_MONOTONIC)}


def incident(addr: str = "127.0.0.1", proxy_port: int = 8000, upstream_port: int = 8080,
             n_small: int = 2, n_big: int = 2) -> dict:
    prefix = make_prefix(addr, proxy_port, upstream_port)
    upstream = nginx = None
    facts: dict = {"proxy": hostport(addr, proxy_port), "upstream": hostport(addr, upstream_port), "prefix": prefix}
    try:
        upstream = subprocess.Popen([sys.executable, os.path.abspath(__file__), "upstream", addr, str(upstream_port)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        facts["upstream_pid"] = json.loads(upstream.stdout.readline())["upstream_pid"]
        nginx = subprocess.Popen([NGINX, "-p", prefix, "-e", f"{prefix}/logs/error.log",
                                  "-c", f"{prefix}/conf/nginx.conf", "-g", "daemon off;"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_listening(proxy_port)
        facts["master_pid"] = nginx.pid
        workers = []
        deadline = time.monotonic() + 10
        while not workers and time.monotonic() < deadline:
            workers = children_of(nginx.pid)
            time.sleep(0.02)
        facts["worker_pids"] = workers
        facts["worker_uid"] = uid_of(workers[0]) if workers else None
        facts["master_uid"] = uid_of(nginx.pid)
        facts["downloads"] = ([download(addr, proxy_port, "/small") for _ in range(n_small)]
                              + [download(addr, proxy_port, "/big") for _ in range(n_big)])
    finally:
        if nginx is not None:
            nginx.send_signal(signal.SIGQUIT)            # graceful stop
            try:
                _, err = nginx.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                nginx.kill()
                _, err = nginx.communicate()
            facts["nginx_stderr"] = err.strip()
        if upstream is not None:
            upstream.terminate()
            try:
                _, err = upstream.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                upstream.kill()
                _, err = upstream.communicate()
            facts["upstream_log"] = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        try:
            with open(f"{prefix}/logs/error.log") as f:
                facts["error_log"] = [line.rstrip("\n") for line in f if "[warn]" not in line]
        except OSError:
            facts["error_log"] = []
        shutil.rmtree(prefix, ignore_errors=True)
    return facts


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "incident"
    if cmd == "upstream":
        serve_upstream(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    if cmd != "incident":
        sys.exit(f"unknown command {cmd!r} (incident, upstream)")
    args = sys.argv[2:]
    addr = args[0] if len(args) > 0 else "127.0.0.1"
    ints = [int(a) for a in args[1:]]
    defaults = [8000, 8080, 2, 2]
    proxy_port, upstream_port, n_small, n_big = ints + defaults[len(ints):]
    print(json.dumps({"scenario": "nginx_incident", **incident(addr, proxy_port, upstream_port, n_small, n_big)}),
          flush=True)
