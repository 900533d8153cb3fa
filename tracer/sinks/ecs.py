"""--format ecs: rsttrace records as Elastic Common Schema documents (schema/rsttrace-ecs-v1.schema.json).

One ECS document per record, for log shippers that feed a SIEM (Filebeat/Elastic Agent, Vector,
Fluent Bit): standard fields where ECS has them, everything else under `rsttrace.*`. Source and
destination follow the packet the event is about: an RST we sent goes from local to remote; an
RST we received, a dropped SYN or final ACK go from remote to local.
"""
from __future__ import annotations

import platform
import socket
from typing import Any

from .records import EVENT_EXTRAS, SYSLOG_SEVERITY, one_line

ECS_VERSION = "8.11.0"
SCHEMA = "rsttrace-ecs/1"

# event.type per rsttrace event kind (ECS allows connection/start/end/denied/info... for network).
EVENT_TYPES = {
    "rst_sent": ["connection", "end"],
    "rst_received": ["connection", "end"],
    "syn_dropped": ["connection", "denied"],
    "ack_dropped": ["connection", "denied"],
    "syn_cookie": ["connection", "info"],
}
# event.kind for the records that are not per-event.
RECORD_KINDS = {"coverage": "state", "listeners": "state", "lost": "metric", "suppressed": "metric",
                "reconciliation": "metric", "summary": "metric", "storm": "event", "aggregate": "metric"}


def host_fields() -> dict[str, Any]:
    name = socket.gethostname()
    return {"hostname": name, "name": name, "os": {"kernel": platform.release(), "type": "linux"}}


def _endpoint(ep: dict) -> dict[str, Any]:
    return {"ip": ep["addr"], "port": ep["port"]}


def _process(proc: dict | None) -> dict[str, Any] | None:
    if not proc or not proc.get("pid"):
        return None
    out: dict[str, Any] = {"pid": proc["pid"]}
    if proc.get("comm"):
        out["name"] = proc["comm"]
    if proc.get("uid") is not None:
        out["user"] = {"id": str(proc["uid"])}
    return out


def event_document(rec: dict, host: dict) -> dict[str, Any]:
    inbound = rec["event"] != "rst_sent"
    local, remote = _endpoint(rec["local"]), _endpoint(rec["remote"])
    proc = rec.get("process") or {}
    doc: dict[str, Any] = {
        "@timestamp": rec["time"],
        "ecs": {"version": ECS_VERSION},
        "message": rec["explanation"],
        "event": {
            "kind": "event",
            "category": ["network"],
            "type": EVENT_TYPES.get(rec["event"], ["connection", "info"]),
            "action": rec["event"],
            "reason": rec["reason"],
            "severity": SYSLOG_SEVERITY[_severity(rec)],
            "module": "rsttrace",
            "dataset": "rsttrace.event",
        },
        "source": remote if inbound else local,
        "destination": local if inbound else remote,
        "network": {"transport": "tcp", "iana_number": "6", "type": rec["family"],
                    "direction": "ingress" if inbound else "egress"},
        "related": {"ip": sorted({local["ip"], remote["ip"]})},
        "host": host,
        "rsttrace": {
            "schema": SCHEMA,
            "record": "event",
            "kernel_reason": rec["kernel_reason"],
            "inferred": rec["inferred"],
            "state": rec["state"],
            "netns": rec["netns"],
            "context": rec["context"],
            "local": rec["local"],
            "remote": rec["remote"],
            "socket": rec["socket"],
            "queues": rec["queues"],
            "process_source": proc.get("source"),
            "cgroup": proc.get("cgroup"),
            "evidence": rec["evidence"],
            "ktime_ns": rec["ktime_ns"],
        },
    }
    for extra in EVENT_EXTRAS:
        if extra in rec:
            doc["rsttrace"][extra] = rec[extra]
    process = _process(proc)
    if process:
        doc["process"] = process
        if "user" in process:
            doc["related"]["user"] = [process["user"]["id"]]
    container = proc.get("container")
    if container:
        doc["container"] = {"id": container["id"], "runtime": container["runtime"]}
        pod = container.get("pod")
        if pod:
            if pod["container"]:
                doc["container"]["name"] = pod["container"]
            doc["orchestrator"] = {"type": "kubernetes", "namespace": pod["namespace"],
                                   "resource": {"type": "pod", "name": pod["name"]}}
    return doc


# A connection's story (`connection` records): event.type and event.outcome per outcome.
CONNECTION_TYPES = {"established": (["connection", "start"], "success"),
                    "never_established": (["connection", "denied"], "failure"),
                    "client_only": (["connection", "end"], "failure"),
                    "reset": (["connection", "end"], "failure"),
                    "open": (["connection", "info"], "unknown")}


def connection_document(rec: dict, host: dict) -> dict[str, Any]:
    """A `connection` record: the client as source, the server as destination, the client's process."""
    types, outcome = CONNECTION_TYPES[rec["outcome"]]
    client, server = _endpoint(rec["client"]), _endpoint(rec["server"])
    doc: dict[str, Any] = {
        "@timestamp": rec["time"],
        "ecs": {"version": ECS_VERSION},
        "message": rec["explanation"],
        "event": {"kind": "event", "category": ["network"], "type": types, "outcome": outcome,
                  "action": "connection", "reason": rec["outcome"], "severity": SYSLOG_SEVERITY[_severity(rec)],
                  "module": "rsttrace", "dataset": "rsttrace.connection"},
        "source": client,
        "destination": server,
        "network": {"transport": "tcp", "iana_number": "6", "type": rec["family"]},
        "related": {"ip": sorted({client["ip"], server["ip"]})},
        "host": host,
        "rsttrace": {"schema": SCHEMA, "record": "connection",
                     "connection": {k: v for k, v in rec.items() if k not in ("schema", "type", "time")}},
    }
    process = _process(rec["client"]["process"])
    if process:
        doc["process"] = process
    return doc


def record_document(rec: dict, host: dict) -> dict[str, Any]:
    """Any non-event record: its content under rsttrace.<type>, so types never clash in an index."""
    kind = rec["type"]
    body = {k: v for k, v in rec.items() if k not in ("schema", "type", "time")}
    return {
        "@timestamp": rec["time"],
        "ecs": {"version": ECS_VERSION},
        "message": one_line(rec),
        "event": {"kind": RECORD_KINDS.get(kind, "state"), "action": kind, "module": "rsttrace",
                  "dataset": f"rsttrace.{kind}", "severity": SYSLOG_SEVERITY[_severity(rec)]},
        "host": host,
        "rsttrace": {"schema": SCHEMA, "record": kind, kind: body},
    }


def _severity(rec: dict) -> str:
    from .records import severity_of
    return severity_of(rec)


def to_ecs(rec: dict, host: dict) -> dict[str, Any]:
    if rec["type"] == "event":
        return event_document(rec, host)
    if rec["type"] == "connection":
        return connection_document(rec, host)
    return record_document(rec, host)
