"""Where the shipped BPF sources and schema live (source checkout or installed package)."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _first_existing(*candidates: Path) -> Path:
    for path in candidates:
        if path.exists():
            return path
    return candidates[0]


# In a checkout (and an editable install) bpf/ and schema/ sit beside tracer/; a wheel carries
# them inside the package as tracer/bpf and tracer/schema (see pyproject.toml), and so does the
# Debian package, which installs that wheel into /usr/lib/python3/dist-packages.
BPF_DIR = _first_existing(_PACKAGE / "bpf", _PACKAGE.parent / "bpf")
SCHEMA_DIR = _first_existing(_PACKAGE / "schema", _PACKAGE.parent / "schema")
KERNEL_HEADERS_DIR = BPF_DIR / "kernel-headers"
EVENT_HEADER = BPF_DIR / "rsttrace.h"
