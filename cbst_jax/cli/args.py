"""What the argparse command lines share: the parser, the ``H,W`` size type, the arguments that
name a stage of a finished run, and the one-line error every bad input ends with (exit status 2)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_USAGE = 2


class UsageError(ValueError):
    """Arguments a command cannot use; one line."""


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A command's parser, its module docstring as the description."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def size(text: str) -> tuple[int, int]:
    """``H,W`` (two integers), an argparse type."""
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected H,W (two integers)") from None
    return h, w


def add_stage_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """``--workdir`` (a run's folder or one seed's), ``--stage`` and ``--seed``."""
    which = "with --workdir: " if not required else ""
    parser.add_argument("--workdir", required=required, default=None, help="a run's folder or one seed's (seed_<s>)")
    parser.add_argument("--stage", required=required, default=None,
                        help=f"{which}source, or <method>/r<round> (e.g. cbst/r2)")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"{which}which seed_<s> when the folder holds several")


def trained_stage(workdir: str, stage_text: str, seed: int | None):
    """(the seed's folder, the stage) that ``--workdir``, ``--stage`` and ``--seed`` name, the
    stage trained and its weights verified; UsageError otherwise."""
    from cbst_jax.methods import Stage
    from cbst_jax.run_ledger import find_trained_stage
    from cbst_jax.workdir import WorkdirError

    try:
        stage = Stage.parse(stage_text)
    except ValueError as e:
        raise UsageError(f"--stage {e}") from None
    try:
        return find_trained_stage(workdir, stage, seed), stage
    except WorkdirError as e:
        raise UsageError(str(e)) from None


def one_line_errors(command: Callable[[], int], errors: tuple) -> int:
    """``command()``'s exit status; any of ``errors`` (and UsageError) is one ``error: ...``
    line on stderr and exit status 2."""
    try:
        return command()
    except (UsageError,) + tuple(errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
