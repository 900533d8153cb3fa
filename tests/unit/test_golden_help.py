"""`rsttrace --help` and every subcommand's `--help` are what they were: compared byte for byte with
tests/data/golden/help/<command>.txt (`rsttrace.txt` for the main command).

The text is rendered by click's CliRunner at a fixed terminal width (HELP_WIDTH columns, COLUMNS set
too), so it is the same on any terminal and host. The subcommands are read from the click group:
a new one fails here until its golden file is written, a removed one leaves a stale file that fails.

RSTTRACE_UPDATE_GOLDEN=1 rewrites the files from the current code (tests/unit/golden.py); review
their diff like any other change.
"""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from golden import GOLDEN, UPDATE, assert_golden, stale
from tracer import cli

HELP = GOLDEN / "help"
HELP_WIDTH = 100


def commands() -> list[str]:
    return ["rsttrace", *sorted(cli.main.commands)]


def help_text(command: str, flag: str = "--help") -> str:
    args = [flag] if command == "rsttrace" else [command, flag]
    result = CliRunner(env={"COLUMNS": str(HELP_WIDTH), "NO_COLOR": "1"}).invoke(
        cli.main, args, prog_name="rsttrace", terminal_width=HELP_WIDTH)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", commands())
def test_help_reads_as_before(command):
    assert_golden(HELP / f"{command}.txt", help_text(command))


@pytest.mark.parametrize("command", commands())
def test_short_help_flag_prints_the_same_help(command):
    assert help_text(command, "-h") == help_text(command)


def test_every_golden_help_belongs_to_a_command():
    left = stale(HELP, {f"{c}.txt" for c in commands()})
    if UPDATE:
        for name in left:
            (HELP / name).unlink()
        return
    assert not left, f"golden help for commands rsttrace no longer has: {left} (RSTTRACE_UPDATE_GOLDEN=1 removes them)"
