"""Real TCP incidents, run as their own processes (usually inside a private netns via `ip netns exec`).

Each scenario prints one JSON line of facts (pids, ports, errors seen) for the test to compare with
what rsttrace reported. Bounded: every socket has a timeout, nothing loops without a limit.

    python3 resets.py closed_port    ADDR PORT
    python3 resets.py unread_close   ADDR PORT [NBYTES]
    python3 resets.py linger_zero    ADDR PORT
    python3 resets.py client_abort   ADDR PORT      the client aborts (SO_LINGER {1,0}); the server, blocked
                                                   in recv(), gets ECONNRESET and closes that socket at once
"""
from __future__ import annotations

import errno
import json
import os
import socket
import struct
import sys
import time

TIMEOUT = 5.0


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _listener(addr: str, port: int) -> socket.socket:
    srv = socket.socket(_family(addr), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(16)
    srv.settimeout(TIMEOUT)
    return srv


def _error_name(exc: OSError | None) -> str | None:
    return errno.errorcode.get(exc.errno, str(exc.errno)) if exc and exc.errno else (str(exc) if exc else None)


def closed_port(addr: str, port: int) -> dict:
    s = socket.socket(_family(addr), socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    err = None
    try:
        s.connect((addr, port))
    except OSError as exc:
        err = exc
    local_port = s.getsockname()[1]
    s.close()
    return {"client_pid": os.getpid(), "client_port": local_port, "error": _error_name(err)}


def _peer_pair(addr: str, port: int, server_action) -> dict:
    """Fork: the child is the client, the parent the server that runs `server_action(conn)`."""
    srv = _listener(addr, port)
    ready_r, ready_w = os.pipe()
    result_r, result_w = os.pipe()
    child = os.fork()
    if child == 0:   # client
        os.close(ready_r)
        os.close(result_r)
        out = {"client_pid": os.getpid()}
        try:
            c = socket.create_connection((addr, port), timeout=TIMEOUT)
            out["client_port"] = c.getsockname()[1]
            c.sendall(b"x" * int(os.environ.get("SCENARIO_NBYTES", "1000")))
            os.write(ready_w, b"1")
            try:
                data = c.recv(1)
                out["client_error"] = None if data else "EOF"
            except OSError as exc:
                out["client_error"] = _error_name(exc)
            # Keep the socket (and its fd) a little, as a client reporting the error would; 0: close at once.
            time.sleep(float(os.environ.get("SCENARIO_CLIENT_HOLD_S", "0.5")))
            c.close()
        except OSError as exc:
            out["client_error"] = _error_name(exc)
        os.write(result_w, json.dumps(out).encode())
        os._exit(0)
    os.close(ready_w)
    os.close(result_w)
    conn, _ = srv.accept()
    os.read(ready_r, 1)           # the client's bytes are in flight
    time.sleep(0.1)               # ... and have arrived in conn's receive queue
    server_facts = server_action(conn)
    srv.close()
    os.waitpid(child, 0)
    client = json.loads(os.read(result_r, 65536) or b"{}")
    return {"server_pid": os.getpid(), "server_port": port, **server_facts, **client}


def unread_close(addr: str, port: int) -> dict:
    def close_without_reading(conn):
        conn.close()
        return {}
    return _peer_pair(addr, port, close_without_reading)


def linger_zero(addr: str, port: int) -> dict:
    def abortive_close(conn):
        conn.recv(65536)          # read everything: no unread data, so linger decides
        time.sleep(0.05)
        while True:               # drain what is left of the client's bytes
            conn.setblocking(False)
            try:
                if not conn.recv(65536):
                    break
            except BlockingIOError:
                break
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        return {}
    return _peer_pair(addr, port, abortive_close)


def client_abort(addr: str, port: int) -> dict:
    """Like a server whose client crashed or gave up: the server learns of it from recv() and closes the
    connection at once (its socket is gone before anyone can look it up), but keeps listening."""
    srv = _listener(addr, port)
    child = os.fork()
    if child == 0:   # client
        c = socket.create_connection((addr, port), timeout=TIMEOUT)
        time.sleep(0.2)           # the server is blocked in recv()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        os._exit(0)
    conn, peer = srv.accept()
    try:
        conn.recv(1)
        error = None
    except OSError as exc:
        error = _error_name(exc)
    conn.close()
    os.waitpid(child, 0)
    time.sleep(0.5)               # still listening while the tracer names the owner
    srv.close()
    return {"server_pid": os.getpid(), "client_pid": child, "client_port": peer[1], "server_error": error}


SCENARIOS = {"closed_port": closed_port, "unread_close": unread_close, "linger_zero": linger_zero,
             "client_abort": client_abort}

if __name__ == "__main__":
    name, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if len(sys.argv) > 4:
        os.environ["SCENARIO_NBYTES"] = sys.argv[4]
    print(json.dumps({"scenario": name, **SCENARIOS[name](addr, port)}), flush=True)
