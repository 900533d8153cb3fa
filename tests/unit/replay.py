"""Recorded ring chunks through the event path (tracer/pipeline.py) as the session feeds it, on a
fixed clock: what the fast-path, ring-replay and golden tests share."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from tracer.enrich.attribution import Attributor
from tracer.enrich.stories import Stories
from tracer.events.decode import Decoder
from tracer.pipeline import Pipeline
from tracer.sinks.jsonl import JsonSink
from tracer.sinks.output import LineOutput

MONO_TO_WALL = 1_764_000_000_000_000_000      # 2025-11-24, a fixed wall clock for the records' times


def replay(chunks: list[bytes], options, sinks: list, reason_names: dict[str, dict[int, str]],
           ksym: Callable[[int], str], attributor: Attributor | None = None,
           mono_to_wall: int = MONO_TO_WALL) -> Pipeline:
    """Each chunk read and flushed as one poll of the ring; the pipeline, for its counts."""
    attributor = attributor or Attributor(context_known=True)
    stories = Stories(attributor) if options.stories else None
    pipeline = Pipeline(options, sinks, Decoder(reason_names, mono_to_wall=mono_to_wall), attributor, ksym=ksym,
                        stories=stories)
    assert (pipeline.fast is not None) == options.fast_path
    for chunk in chunks:
        pipeline.read(chunk)
        pipeline.flush()
    return pipeline


def replay_json(path: Path, chunks: list[bytes], options, reason_names: dict[str, dict[int, str]],
                ksym: Callable[[int], str]) -> tuple[bytes, Pipeline]:
    """replay() into rsttrace's JSON lines at `path`: the bytes written, and the pipeline."""
    out = LineOutput(str(path))
    pipeline = replay(chunks, options, [JsonSink(out)], reason_names, ksym)
    out.close()
    return path.read_bytes(), pipeline
