"""The command synopsis of docs/training.md ("## Commands") against the parser: every option of every command it
lists is shown there, and nothing is shown that the parser does not take. A new option fails here until the page
has it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from qlora_ref.cli import build_parser

PAGE = Path(__file__).resolve().parent.parent / "docs" / "training.md"


def synopsis() -> dict[str, set[str]]:
    """command -> the options its lines of the synopsis show."""
    block = PAGE.read_text().split("## Commands\n", 1)[1].split("```\n", 1)[1].split("```", 1)[0]
    shown: dict[str, set[str]] = {}
    command = None
    for line in block.splitlines():
        m = re.match(r"qlora (\w+)", line)
        if m:
            command = m.group(1)
        line = line.split("#", 1)[0]  # a comment is prose, not options
        shown.setdefault(command, set()).update(re.findall(r"--[a-z][a-z0-9-]*", line))
    return shown


def parser_options(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {o for a in sub.choices[command]._actions for o in a.option_strings if o.startswith("--")} - {"--help"}


SHOWN = synopsis()


def test_the_synopsis_lists_the_commands_users_run():
    assert {"finetune", "demo", "generate", "evaluate", "plot", "merge", "quantize"} <= SHOWN.keys()


@pytest.mark.parametrize("command", sorted(SHOWN))
def test_the_synopsis_shows_every_option_and_no_other(command):
    assert SHOWN[command] == parser_options(command)
