"""The ``qlora`` command: argument parsing and printing over library functions, nothing else. Each subcommand lives
in its own module of this package (``finetune``: finetune, demo, generate, evaluate, merge, quantize; ``memory``;
``plot``; ``reproduce``; ``doctor``), which exposes ``add_parser(subparsers)`` and sets ``func`` on its parser;
this file only collects them."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from pathlib import Path

#: modules that contribute a subcommand, in the order ``qlora --help`` lists them
SUBCOMMAND_MODULES: list[str] = ["qlora_ref.cli.memory", "qlora_ref.cli.finetune", "qlora_ref.cli.plot",
                                   "qlora_ref.cli.reproduce", "qlora_ref.cli.doctor"]


class _VersionAction(argparse.Action):
    """``qlora --version``: the installed version and, in a git checkout, the commit (asked only when used)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from .doctor import version_line

        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora", description="QLoRA: fine-tune a frozen 4-bit model through LoRA adapters"
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version (and commit) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


@contextlib.contextmanager
def _warnings_as_messages(command: str, enabled: bool):
    """qlora's own warnings (a data report's dropped examples, a fallback taken) as one line each, ``qlora
    finetune: warning: ...``, not Python's file:line and source line; every other warning as Python prints it.
    Only for the command line itself (``enabled``): ``main(argv)`` called from Python leaves warnings alone, so a
    caller that records them (``pytest.warns``, ``warnings.catch_warnings``) still gets them."""
    default = warnings.showwarning
    if not enabled:
        yield
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and {"qlora_ref", "qlora_gpu"} & set(Path(filename).parts):
            print(f"qlora {command}: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = default


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command as given (``qlora finetune --nproc N`` runs it again under torchrun)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        with _warnings_as_messages(args.command, enabled=command_line):
            return int(args.func(args) or 0)
    except ValueError as e:
        print(f"qlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (``qlora memory --json | head``): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 1
    except OSError as e:  # a full disk, a folder gone: one line naming the file (``files.WriteError``), not a traceback
        print(f"qlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line (a command may say what it kept), the shell's status 130
        print(f"qlora {args.command}: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130

