"""Without orjson (Debian 12 packages none), the standard library writes the JSON outputs: the same
records, value for value, as the golden files orjson wrote — the normal path, the fast path's
templates, ECS documents. A float may be spelt otherwise (4e-05 for 0.00004); nothing else differs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_golden_sinks import SINKS, capture_ecs, capture_json, normalise
from tracer.sinks import jsonenc


@pytest.fixture
def stdlib_json(monkeypatch):
    calls = []

    def dumps(obj) -> bytes:
        calls.append(1)
        return jsonenc.stdlib_dumps(obj)
    monkeypatch.setattr(jsonenc, "dumps", dumps)
    monkeypatch.setattr(jsonenc, "loads", json.loads)
    return calls


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("name,capture", [("json.jsonl", capture_json), ("ecs.jsonl", capture_ecs),
                                          ("json.jsonl", lambda tmp: capture_json(tmp, fast=True))])
def test_the_standard_library_writes_the_golden_records(stdlib_json, tmp_path, name, capture):
    got = normalise(capture(tmp_path))
    want = (SINKS / name).read_text()
    assert records(got) == records(want)
    assert stdlib_json                 # the standard library wrote them


def test_without_orjson_the_standard_library_is_chosen():
    code = ("import sys; sys.modules['orjson'] = None\n"
            "from tracer.sinks import jsonenc\n"
            "print(jsonenc.ENCODER, jsonenc.dumps({1: 'é', 'x': [0.5, None]}).decode())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == 'json {"1":"é","x":[0.5,null]}\n'
