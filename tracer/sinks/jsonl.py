"""JSON lines: one record per line — rsttrace's own shape (schema/rsttrace-v1.schema.json) or, with
--format ecs, the same record as an Elastic Common Schema document (schema/rsttrace-ecs-v1.schema.json)."""
from __future__ import annotations

import json

from . import ecs
from .output import LineOutput


class JsonSink:
    def __init__(self, output: LineOutput, fmt: str = "json"):
        self.output = output
        self._host = ecs.host_fields() if fmt == "ecs" else None

    def emit(self, record: dict) -> None:
        doc = record if self._host is None else ecs.to_ecs(record, self._host)
        self.output.write_line(json.dumps(doc, separators=(",", ":"), ensure_ascii=False))

    def flush(self) -> None:
        self.output.flush()

    def reopen(self) -> None:
        self.output.reopen()

    def close(self) -> None:
        self.output.close()
