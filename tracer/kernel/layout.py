"""The ring record's layout, read from bpf/rsttrace.h — the single definition of the kernel/user
contract (what the sinks write is another thing: tracer/sinks/records.py, the output records).

The ctypes structure and the constants (kinds, flags, stat slots) are built from the C header at
import time, so there is no second copy to keep in sync; tests/unit/test_record_layout.py compiles
the header with the system C compiler and checks the offsets below against it.
"""
from __future__ import annotations

import ctypes
import re
import struct

from ..paths import EVENT_HEADER

_STRUCT_CODES = {"__u8": "B", "__u16": "H", "__u32": "I", "__u64": "Q", "__s32": "i", "__s64": "q"}
_CTYPES = {
    "__u8": ctypes.c_uint8, "__u16": ctypes.c_uint16, "__u32": ctypes.c_uint32, "__u64": ctypes.c_uint64,
    "__s32": ctypes.c_int32, "__s64": ctypes.c_int64, "char": ctypes.c_char,
}


def _parse_header(text: str):
    defines = {m.group(1): int(m.group(2), 0)
               for m in re.finditer(r"^#define\s+(RSTTRACE_\w+)\s+(0x[0-9a-fA-F]+|\d+)u?\b", text, re.M)}
    enums: dict[str, dict[str, int]] = {}
    for enum_name, body in re.findall(r"enum\s+(rsttrace_\w+)\s*\{(.*?)\};", text, re.S):
        body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
        enums[enum_name] = {name: int(value) for name, value in re.findall(r"(RSTTRACE_\w+)\s*=\s*(\d+)", body)}
    structs = {}
    for struct_name, body in re.findall(r"struct\s+(rsttrace_\w+)\s*\{(.*?)\};", text, re.S):
        body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
        fields = []
        for ctype, name, count in re.findall(r"(\w+)\s+(\w+)(?:\[(\w+)\])?\s*;", body):
            base = _CTYPES[ctype]
            if count:
                base = base * (int(count) if count.isdigit() else defines[count])
            fields.append((name, base))
        structs[struct_name] = fields
    return defines, enums, structs


with open(EVENT_HEADER) as _f:
    DEFINES, ENUMS, STRUCTS = _parse_header(_f.read())


def struct_layout(cls, only: set[str] | None = None) -> tuple[str, dict[str, int | slice]]:
    """A `struct` format for a ctypes structure (little-endian; fields in the header are ordered so
    that only the tail pads to the struct's alignment), and where each field lands in the unpacked
    tuple: an index, or a slice for arrays of numbers. With `only`, the other fields are skipped
    (pad bytes: nothing made of them)."""
    fmt, where, at = "<", {}, 0
    for name, ctype in cls._fields_:
        if struct.calcsize(fmt) != getattr(cls, name).offset:
            raise ValueError(f"{cls.__name__}.{name}: padding before it (reorder the header's fields)")
        if only is not None and name not in only:
            fmt += f"{ctypes.sizeof(ctype)}x"
            continue
        if issubclass(ctype, ctypes.Array):
            base, n = ctype._type_, ctype._length_
            if base is ctypes.c_char or base is ctypes.c_uint8:      # text and raw bytes: one bytes item
                fmt += f"{n}s"
                where[name], at = at, at + 1
            else:
                fmt += f"{n}{_STRUCT_CODES[_CTYPE_NAMES[base]]}"
                where[name], at = slice(at, at + n), at + n
        else:
            fmt += _STRUCT_CODES[_CTYPE_NAMES[ctype]]
            where[name], at = at, at + 1
    tail = ctypes.sizeof(cls) - struct.calcsize(fmt)
    return fmt + ("x" * tail), where


_CTYPE_NAMES = {v: k for k, v in _CTYPES.items() if k in _STRUCT_CODES}


class RawEvent(ctypes.Structure):
    """struct rsttrace_event"""
    _fields_ = STRUCTS["rsttrace_event"]


class CountKey(ctypes.Structure):
    """struct rsttrace_count_key"""
    _fields_ = STRUCTS["rsttrace_count_key"]


class RawStory(ctypes.Structure):
    """struct rsttrace_story: a connection's story (bpf/story.bpf.c)"""
    _fields_ = STRUCTS["rsttrace_story"]


class RawStoryKey(ctypes.Structure):
    """struct rsttrace_story_key: a story's key in the kernel's map"""
    _fields_ = STRUCTS["rsttrace_story_key"]


# The same record for struct.iter_unpack (the ring reader decodes whole batches at once).
EVENT_FORMAT, EVENT_FIELDS = struct_layout(RawEvent)
EVENT_SIZE = struct.calcsize(EVENT_FORMAT)

KIND_NAMES = {value: name[len("RSTTRACE_"):].lower() for name, value in ENUMS["rsttrace_kind"].items()}
HOOK_NAMES = {value: name[len("RSTTRACE_HOOK_"):].lower() for name, value in ENUMS["rsttrace_hook"].items()
              if value}
VERDICT_NAMES = {value: name[len("RSTTRACE_VERDICT_"):].lower() for name, value in ENUMS["rsttrace_verdict"].items()}
OUTCOME_NAMES = {value: name[len("RSTTRACE_OUTCOME_"):].lower() for name, value in ENUMS["rsttrace_outcome"].items()}
STAT_SUBMITTED = ENUMS["rsttrace_stat"]["RSTTRACE_STAT_SUBMITTED"]
STAT_LOST = ENUMS["rsttrace_stat"]["RSTTRACE_STAT_LOST"]
STAT_UNCOUNTED = ENUMS["rsttrace_stat"]["RSTTRACE_STAT_UNCOUNTED"]
STAT_AGGREGATED = ENUMS["rsttrace_stat"]["RSTTRACE_STAT_AGGREGATED"]
STAT_STORM_FULL = ENUMS["rsttrace_stat"]["RSTTRACE_STAT_STORM_FULL"]
STAT_STORIES_FULL = ENUMS["rsttrace_stat"]["RSTTRACE_STAT_STORIES_FULL"]
STAT_APP_PATHS_UNREAD = ENUMS["rsttrace_stat"]["RSTTRACE_STAT_APP_PATHS_UNREAD"]
NO_REASON = DEFINES["RSTTRACE_NO_REASON"]
F_SOFTIRQ = DEFINES["RSTTRACE_F_SOFTIRQ"]
F_HAVE_SOCKET = DEFINES["RSTTRACE_F_HAVE_SOCKET"]
F_LINGER = DEFINES["RSTTRACE_F_LINGER"]
F_FULLSOCK = DEFINES["RSTTRACE_F_FULLSOCK"]
F_QUEUES = DEFINES["RSTTRACE_F_QUEUES"]
F_INFERRED = DEFINES["RSTTRACE_F_INFERRED"]
F_ORPHAN = DEFINES["RSTTRACE_F_ORPHAN"]
F_UNREAD = DEFINES["RSTTRACE_F_UNREAD"]
