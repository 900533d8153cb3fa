"""JSON lines: one record per line, the schema in schema/rsttrace-v1.schema.json."""
from __future__ import annotations

import json

from .output import LineOutput


class JsonSink:
    def __init__(self, output: LineOutput):
        self.output = output

    def emit(self, record: dict) -> None:
        self.output.write_line(json.dumps(record, separators=(",", ":"), ensure_ascii=False))

    def close(self) -> None:
        self.output.close()
