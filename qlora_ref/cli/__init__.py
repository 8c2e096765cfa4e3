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

from ..train.launch import launched_by_torchrun, process_rank

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


#: commands whose SIGTERM (``timeout``, Slurm's preemption, ``docker stop``) is handled as Ctrl-C is: the run
#: stops where it is, says which checkpoint a rerun resumes from and releases its output folder's lock
TERMINATED_AS_INTERRUPTED = ("finetune", "demo")


class _Terminated:
    """A SIGTERM handler that raises ``KeyboardInterrupt`` in the main thread, as Ctrl-C's SIGINT does (the
    command's ``except KeyboardInterrupt`` and ``finally`` blocks run), once, and remembers that it fired: the
    exit status is then 143 (128 + SIGTERM), as the shell reports a process the signal ended."""

    def __init__(self):
        self.fired = False

    def __call__(self, signum, frame):
        if self.fired:  # a second SIGTERM while the first one's clean-up runs: let it finish
            return
        self.fired = True
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt(enabled: bool):
    """``_Terminated`` as SIGTERM's handler for the command's run; the previous handler afterwards. Only for the
    command line itself (``enabled``), never for ``main(argv)`` called from Python."""
    import signal

    handler = _Terminated()
    if not enabled:
        yield handler
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


#: where ``finetune --nproc N`` asks each process torchrun starts to leave its exit status (torchrun itself exits
#: 1 whatever its processes exited with, so a usage error, 2, would reach the shell as 1)
RANK_STATUS_DIR = "QLORA_RANK_STATUS_DIR"


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    folder = os.environ.get(RANK_STATUS_DIR)
    if folder and launched_by_torchrun():
        with contextlib.suppress(OSError):  # the launcher then reports torchrun's own status
            Path(folder, f"rank-{process_rank()}").write_text(str(code))
    return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command as given (``qlora finetune --nproc N`` runs it again under torchrun)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    terminated = None
    try:
        # not for ``finetune --nproc N``, which passes the signal on to torchrun itself (``launch_processes``),
        # nor for a process torchrun started: torchrun stops those with SIGTERM, and a handler would run only once
        # the rank leaves a collective it may be waiting in for good (torchrun's SIGKILL 30 s later); the default
        # action ends it at once, its lock (``flock``) released and its checkpoints whole (written atomically)
        launcher = getattr(args, "nproc", None) is not None
        with _warnings_as_messages(args.command, enabled=command_line), _sigterm_as_interrupt(
                command_line and args.command in TERMINATED_AS_INTERRUPTED and not launcher
                and not launched_by_torchrun()) as terminated:
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
    except KeyboardInterrupt as e:  # Ctrl-C (or SIGTERM, above): one line (a command may say what it kept), the
        # shell's status 130 (143 for SIGTERM)
        print(f"qlora {args.command}: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 143 if terminated is not None and terminated.fired else 130

