"""JSON as bytes for every output: orjson where it is installed (rsttrace's venv, PyPI), else the
standard library — Debian 12 packages no orjson, and rsttrace must run from Debian's python3.

Both write the same JSON: compact separators, non-ASCII kept as UTF-8, int dict keys as strings; only
small floats may read differently (4e-05 for orjson's 0.00004: the same number). tests/unit/
test_jsonenc.py holds the standard library's outputs to the golden files. It is slower at it
(scripts/bench/README.md: what it costs a reset storm). `RSTTRACE_JSON=stdlib` chooses it where orjson
is installed: for tests and benchmarks.
"""
from __future__ import annotations

import json
import os

try:
    if os.environ.get("RSTTRACE_JSON") == "stdlib":
        raise ImportError("RSTTRACE_JSON=stdlib")
    import orjson
except ImportError:
    orjson = None

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def stdlib_dumps(obj) -> bytes:
    return _encode(obj).encode()


if orjson is not None:
    ENCODER = "orjson"
    DecodeError: type[Exception] = orjson.JSONDecodeError
    loads = orjson.loads

    def dumps(obj) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
else:
    ENCODER = "json"
    DecodeError = json.JSONDecodeError
    loads = json.loads
    dumps = stdlib_dumps
