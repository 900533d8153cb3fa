"""JSON lines: one record per line — rsttrace's own shape (schema/rsttrace-v1.schema.json) or, with
--format ecs, the same record as an Elastic Common Schema document (schema/rsttrace-ecs-v1.schema.json).

Encoded by jsonenc.py: orjson where installed (in a reset storm json.dumps was a large share of every
event's cost), else the standard library, byte for byte the same."""
from __future__ import annotations

from . import ecs, jsonenc
from .output import LineOutput


class JsonSink:
    def __init__(self, output: LineOutput, fmt: str = "json"):
        self.output = output
        self._host = ecs.host_fields() if fmt == "ecs" else None
        # rsttrace's own JSON takes the event lines the fast path made (fastpath.py); ECS does not.
        self.write_event_json = output.write_bytes if self._host is None else None
        self.write_event_lines = output.write_lines if self._host is None else None

    def emit(self, record: dict) -> None:
        doc = record if self._host is None else ecs.to_ecs(record, self._host)
        self.output.write_bytes(jsonenc.dumps(doc))

    def flush(self) -> None:
        self.output.flush()

    def reopen(self) -> None:
        self.output.reopen()

    def close(self) -> None:
        self.output.close()
