"""`rsttrace doctor`: the capability probe as a table, with what rsttrace uses and cannot see."""
from __future__ import annotations

import json

from .errors import EXIT_NOT_ROOT, EXIT_OK, EXIT_UNSUPPORTED
from .kernel.capabilities import probe
from .kernel.hooks import plan_hooks


def run_doctor(as_json: bool) -> int:
    caps = probe()
    # What --app-errors and --origins (off by default) would use here, said as such.
    coverage = plan_hooks(caps, app_errors=True, origins=True).coverage
    if coverage.hooks.get("app_errors"):
        coverage.notes["app_errors"] = f"with --app-errors (off by default): {coverage.notes['app_errors']}"
    if (coverage.hooks.get("origins") or "").startswith("raw_tracepoint:net_dev_queue"):
        coverage.notes["origins"] = ("net_dev_queue and netif_receive_skb with --origins (off by default): "
                                     f"{coverage.notes['origins']}")
    fatal = None
    if not caps.can_bpf:
        fatal = (EXIT_NOT_ROOT, "rsttrace cannot load BPF programs here — run it as root (sudo)")
    elif not caps.btf:
        fatal = (EXIT_UNSUPPORTED, "no kernel BTF — rsttrace needs CONFIG_DEBUG_INFO_BTF=y")
    elif caps.tracefs is None:
        fatal = (EXIT_UNSUPPORTED, caps.tracefs_error)
    elif not caps.tracepoints or caps.send_reset is None:
        fatal = (EXIT_UNSUPPORTED, "tracepoint programs or tcp tracepoints unavailable")

    if as_json:
        print(json.dumps({
            "kernel": caps.kernel,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail, "uses": c.uses} for c in caps.checks],
            "coverage": coverage.as_dict(),
            "can_trace": fatal is None,
            "problem": fatal[1] if fatal else None,
        }, indent=2))
        return fatal[0] if fatal else EXIT_OK

    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"rsttrace doctor — kernel {caps.kernel}", title_justify="left")
    table.add_column("check")
    table.add_column("", width=3)
    table.add_column("found")
    table.add_column("used for")
    for c in caps.checks:
        table.add_row(c.name, "[green]yes[/]" if c.ok else "[red]no[/]", c.detail, c.uses)
    console.print(table)
    cov = Table(title="coverage: what rsttrace will use", title_justify="left")
    cov.add_column("events")
    cov.add_column("hook")
    cov.add_column("note")
    for kind, hook in coverage.hooks.items():
        cov.add_row(kind, hook or "[red]not visible[/]", coverage.notes.get(kind, ""))
    console.print(cov)
    for spot in coverage.blind_spots:
        console.print(f"[yellow]blind spot:[/] {spot}")
    if fatal:
        console.print(f"[red]cannot trace:[/] {fatal[1]}")
        return fatal[0]
    console.print("[green]ready:[/] `rsttrace --port PORT` will trace with the hooks above")
    return EXIT_OK
