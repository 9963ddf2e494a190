"""The ``know3d`` command: Know3D without ComfyUI (generate, batch, models, demo, and the command
families of the data, training and evaluation libraries).

Exit codes (scripts may rely on them): 0 ok; 1 a generation failed (for ``batch``: at least one
item failed); 2 bad arguments, unreadable inputs or missing / unusable model files; 130 interrupted
(Ctrl-C or SIGTERM; no partial file is left behind).

``main(argv, pipeline_factory=None)`` is the entry point (``python -m know3d_core.cli`` works too).
``pipeline_factory(options, check)`` builds the object whose ``run(...)`` generates one mesh; by
default it is ``generate.commands.load_pipeline`` (``know3d_core.pipeline.Know3DPipeline``).

This module only builds the parser from the command families and turns outcomes into exit codes:
arguments live in ``generate/arguments.py``, the generation commands in ``generate/commands.py``,
what they write in ``generate/outputs.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
from typing import Any, Callable, Optional, Sequence

from . import __version__
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, UsageError, one_line

__all__ = ["main", "build_parser", "UsageError", "COMMAND_FAMILIES"]

# Command families that live beside their library (``know3d_core/<family>/commands.py``). Each module
# is torch-free at import and exposes ``register(subparsers)``, which adds its sub-commands with
# ``set_defaults(run=callable)``; ``callable(opts) -> int`` returns the exit code and raises
# :class:`UsageError` for bad input (exit code 2).
COMMAND_FAMILIES: tuple = ("know3d_core.generate.commands", "know3d_core.data.commands", "know3d_core.train.commands",
                           "know3d_core.eval.commands")

PipelineFactory = Callable[[argparse.Namespace, Any], Any]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (and exit code 2, as argparse)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------- parser
_DESCRIPTION = """\
Know3D: one front image + a sentence about the object's hidden back -> a 3D mesh.
Qwen-Image-Edit-2511 imagines the back; what it knows is injected into TRELLIS.2.

First steps:
  know3d demo --out demo_out            # tiny random weights, no downloads: checks the install
  know3d models --models M --qwen Q     # which model files are missing, and where to get them
  know3d generate --models M --qwen Q --image chair.png --prompt "a hollow backrest" --out out/chair

Exit codes: 0 ok, 1 a generation failed, 2 bad arguments or missing files, 130 interrupted."""


def build_parser() -> argparse.ArgumentParser:
    """The ``know3d`` parser: global options plus every family's sub-commands."""
    parser = _Parser(prog="know3d", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"know3d {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_FAMILIES:
        importlib.import_module(name).register(sub)
    return parser


# --------------------------------------------------------------------------------------- main
class _NeverRaised(Exception):
    pass


def _knowledge_mismatch_type() -> type:
    """``knowledge.KnowledgeMismatchError`` if it was imported (a mismatch is a bad argument, code 2)."""
    mod = sys.modules.get(__package__ + ".knowledge.kinds")
    return getattr(mod, "KnowledgeMismatchError", _NeverRaised)


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None, *, pipeline_factory: Optional[PipelineFactory] = None) -> int:
    """Run the ``know3d`` command; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        opts = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, bad arguments (one line, code 2)
        return int(e.code or 0)
    if opts.command is None:
        parser.print_help()
        return EXIT_USAGE
    opts.pipeline_factory = pipeline_factory
    previous = None
    with contextlib.suppress(ValueError):  # only the main thread may install handlers
        previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        return opts.run(opts)
    except UsageError as e:
        print(f"know3d {opts.command}: error: {e}", file=sys.stderr)
        details = getattr(e, "details", None)  # e.g. the model check's list of missing files
        if details:
            print(details, file=sys.stderr)
        return EXIT_USAGE
    except _knowledge_mismatch_type() as e:  # evaluated when an exception arrives
        print(f"know3d {opts.command}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"know3d {opts.command}: interrupted; no partial file was kept (finished batch items stay, "
              "rerun to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - one line for users, the traceback with --debug
        if opts.debug:
            raise
        print(f"know3d {opts.command}: failed: {type(e).__name__}: {one_line(e)} (--debug shows the traceback)",
              file=sys.stderr)
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
