"""Write rsttrace's man pages from its click command line: rsttrace.8 and one page per subcommand
(rsttrace-doctor.8, rsttrace-explain.8, which also lists every reason).

    python3 contrib/manpage.py OUTDIR      (with the tracer package to describe on sys.path)

Made from the same objects `--help` prints, so a page cannot drift from the command it documents.
The date is SOURCE_DATE_EPOCH's where set (a package build sets it): the same tree gives the same pages.
"""
from __future__ import annotations

import inspect
import os
import sys
import time
from pathlib import Path

import click

from tracer import __version__
from tracer.cli import main
from tracer.enrich.reasons import CATALOG

SECTION = "8"      # rsttrace needs root's capabilities: an administration command


def roff(text: str) -> str:
    """Text as roff reads it literally: backslashes, minus signs, and control characters at a line's start."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def prose(help_text: str) -> list[str]:
    """click's help as roff: paragraphs flow; a `\\b` paragraph keeps its lines, and one that opens
    with "Examples:" becomes the EXAMPLES section."""
    out: list[str] = []
    for para in inspect.cleandoc(help_text).split("\n\n"):
        lines = para.split("\n")
        if lines[0].strip() != "\b":
            out += [".PP", roff(" ".join(line.strip() for line in lines))]
            continue
        lines = lines[1:]
        if lines and lines[0].strip() == "Examples:":
            out += [".SH EXAMPLES"]
            lines = lines[1:]
        out += [".PP", ".nf", roff(inspect.cleandoc("\n".join(lines))), ".fi"]
    return out


def options(command: click.Command, ctx: click.Context) -> list[str]:
    out = [".SH OPTIONS"]
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record:
            out += [".TP", f".B {roff(record[0])}", roff(record[1])]
    return out


def page(command: click.Command, name: str, title: str, summary: str, extra: list[str], see_also: list[str]) -> str:
    ctx = click.Context(command, info_name=name)
    summary = summary[:1].lower() + summary[1:].rstrip(".")     # NAME's line, as man pages write it
    date = time.strftime("%Y-%m-%d", time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))))
    lines = [f'.TH {title.upper()} {SECTION} "{date}" "rsttrace {__version__}" "System Administration"',
             ".SH NAME", f"{roff(title)} \\- {roff(summary)}",
             ".SH SYNOPSIS", f".B {roff(name)}", roff(" ".join(command.collect_usage_pieces(ctx))),
             ".SH DESCRIPTION"]
    body = prose(command.help or "")
    # An EXAMPLES section from the help text comes after the options, as man pages order them.
    split = body.index(".SH EXAMPLES") if ".SH EXAMPLES" in body else len(body)
    lines += body[:split] + options(command, ctx) + extra + body[split:]
    if command.epilog:
        lines += prose(command.epilog)
    lines += [".SH \"SEE ALSO\"", ",\n".join(f".BR {roff(p)} ({SECTION})" for p in see_also)]
    return "\n".join(lines) + "\n"


def write_all(outdir: Path) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    subpages = [f"rsttrace-{name}" for name in main.commands]
    commands = [".SH COMMANDS"]
    for name, sub in main.commands.items():
        commands += [".TP", f".BR rsttrace\\-{roff(name)} ({SECTION})", roff(sub.get_short_help_str(limit=200))]
    written = []

    def write(filename: str, text: str) -> None:
        path = outdir / filename
        path.write_text(text)
        written.append(path)

    first_line = inspect.cleandoc(main.help or "").split("\n")[0]
    write(f"rsttrace.{SECTION}", page(main, "rsttrace", "rsttrace", first_line, commands, subpages))
    for name, sub in main.commands.items():
        extra: list[str] = []
        if name == "explain":
            extra = [".SH REASONS"]
            for r in CATALOG.values():
                extra += [".TP", f".B {roff(r.name)}", roff(f"{r.title} ({', '.join(r.events)})")]
        write(f"rsttrace-{name}.{SECTION}", page(sub, f"rsttrace {name}", f"rsttrace-{name}",
                                                  sub.get_short_help_str(limit=200), extra,
                                                  ["rsttrace"] + [p for p in subpages if p != f"rsttrace-{name}"]))
    return written


if __name__ == "__main__":
    for path in write_all(Path(sys.argv[1])):
        print(path)
