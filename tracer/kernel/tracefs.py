"""tracefs: mount it when missing, and read tracepoint formats (fields and symbolic enum names)."""
from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass, field

TRACEFS_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


class TracefsError(RuntimeError):
    pass


def _is_mounted(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "events"))


def tracefs_root(mount: bool = True) -> str:
    """Path of a mounted tracefs; mounts it at /sys/kernel/tracing when allowed and needed."""
    for path in TRACEFS_PATHS:
        if _is_mounted(path):
            return path
    if not mount:
        raise TracefsError("tracefs is not mounted; run: mount -t tracefs tracefs /sys/kernel/tracing")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tracefs", TRACEFS_PATHS[0].encode(), b"tracefs", 0, None) != 0:
        err = os.strerror(ctypes.get_errno())
        raise TracefsError(
            f"tracefs is not mounted and mounting it failed ({err}); run: mount -t tracefs tracefs /sys/kernel/tracing")
    return TRACEFS_PATHS[0]


@dataclass
class TracepointFormat:
    category: str
    name: str
    fields: dict[str, str] = field(default_factory=dict)   # field name -> C type as written
    print_fmt: str = ""

    def has(self, name: str) -> bool:
        return name in self.fields

    def symbols(self, field_name: str) -> dict[int, str]:
        """Value → name from `__print_symbolic(REC->field, { 0, "NAME" }, ...)` in the print format.

        The kernel prints its own enum names there, so rsttrace never carries a numbering table.
        """
        start = self.print_fmt.find(f"__print_symbolic(REC->{field_name},")
        if start < 0:
            return {}
        body = _balanced(self.print_fmt, start + len("__print_symbolic"))
        return {int(v, 0): n for v, n in re.findall(r'\{\s*(-?(?:0x)?[0-9a-fA-F]+)\s*,\s*"([^"]+)"\s*\}', body)}


def _balanced(text: str, open_paren: int) -> str:
    """The text inside the parentheses that open at `open_paren` (quotes respected)."""
    depth, i, quoted = 0, open_paren, False
    while i < len(text):
        ch = text[i]
        if ch == '"' and text[i - 1] != "\\":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
            if depth == 0:
                return text[open_paren + 1:i]
        i += 1
    return text[open_paren + 1:]


_FIELD_RE = re.compile(r"field:(?P<decl>[^;]+);\s*offset:\d+;\s*size:\d+;")


def parse_format(category: str, name: str, text: str) -> TracepointFormat:
    fmt = TracepointFormat(category, name)
    for m in _FIELD_RE.finditer(text):
        decl = m.group("decl").strip()
        decl = re.sub(r"\[.*\]$", "", decl)          # arrays: "__u8 saddr[28]"
        ctype, _, fname = decl.rpartition(" ")
        fname = fname.lstrip("*")
        if not fname.startswith("common_"):
            fmt.fields[fname] = ctype.strip()
    pm = re.search(r"^print fmt: (.*)$", text, re.M | re.S)
    fmt.print_fmt = pm.group(1) if pm else ""
    return fmt


def read_format(root: str, category: str, name: str) -> TracepointFormat | None:
    path = os.path.join(root, "events", category, name, "format")
    try:
        with open(path) as f:
            return parse_format(category, name, f.read())
    except FileNotFoundError:
        return None
