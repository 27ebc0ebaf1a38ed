"""What every entry point does with bad input: one line on stderr and a documented exit status.

Schedulers read the status: 0 finished, 1 failed, 2 bad input (flags, config, data, weights, workdir
contents), 3 preempted after saving (train). `--debug` keeps the traceback instead of the line.

All seven commands (`train`, `evaluate`, `export`, `compile_check`, `viz`, `data.build_shards`, `data.leakage`) go
through `run` (or, for the builder, which keeps its own flags, `guarded`), so the line always reads
`PROG: what is wrong` and the status always follows `exit_status`.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import glob
import importlib.util
import os
import sys
import traceback
from typing import Callable

from absl import app, flags

EXIT_FINISHED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PREEMPTED = 0, 1, 2, 3

# What a user can mend by changing what they passed. The project's own errors (ConfigError, SpecError,
# ConversionError, DataSpecError, ...) are ValueErrors; a path that is missing, or a file where a folder
# should be (or the reverse), is the user's too. Any other OSError (disk full, permissions, a lock held)
# and RuntimeError is a failure of the run: status 1.
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
             app.UsageError, flags.Error)
HANDLED = BAD_INPUT + (OSError, RuntimeError)


def one_line(message: str) -> str:
    if "Traceback (most recent call last)" in message:  # absl embeds a config file's traceback
        lines = [line for line in message.splitlines() if line.strip()]
        message = f"{lines[0]} {lines[-1]}"
    return " ".join(message.split())


def exit_status(error: BaseException) -> int:
    return EXIT_BAD_INPUT if isinstance(error, BAD_INPUT) else EXIT_FAILED


def fail(prog: str, error: BaseException) -> int:
    """Prints `PROG: the error` as one line on stderr; returns the status it calls for."""
    print(f"{prog}: {one_line(str(error))}", file=sys.stderr, flush=True)
    return exit_status(error)


def guarded(prog: str, main: Callable[[list[str]], int | None], debug: Callable[[], bool]):
    """`main(argv)` with the errors of HANDLED turned into one line and a status; with `debug()`, the
    traceback comes first (printed here: absl would answer a re-raised UsageError with its help page)."""

    @functools.wraps(main)
    def run_main(argv: list[str]) -> int:
        try:
            status = main(argv)
        except HANDLED as e:
            if debug():
                traceback.print_exc()
            return fail(prog, e)
        return EXIT_FINISHED if status is None else status

    return run_main


def _debug_flag() -> bool:
    return bool(flags.FLAGS["debug"].value) if "debug" in flags.FLAGS else False


def flags_parser(prog: str, config_flag=None) -> Callable[[list[str]], list[str]]:
    """absl's flag parsing for `app.run(..., flags_parser=...)`, with a bad flag, a missing config file
    or a `--config.key` typo reported as one line (exit 2). ml_collections raises a raw AttributeError,
    in three chained tracebacks, for an unknown config key."""

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
            if config_flag is not None:
                config_flag.value  # noqa: B018 - the config file loads lazily; a missing one fails here, not later
            return rest
        except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
            if "--debug" in argv:
                raise
            message = str(e)
            if isinstance(e, (AttributeError, KeyError)):  # its text is the repr of a KeyError's message
                with contextlib.suppress(ValueError, SyntaxError):
                    message = str(ast.literal_eval(message))
                message = f"unknown config key {message}"
            print(f"{prog}: {one_line(message)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)

    return parse


def _skip_libtpu_without_a_tpu() -> None:
    """Keeps jax from starting libtpu on a machine that has it installed (the `tpu` extra, which the test
    extra pulls in) but no TPU: libtpu then prints several lines of start-up errors before the one line
    that matters, and, while another run holds /tmp/libtpu_lockfile, tells the user to delete it. A TPU VM
    shows its chips as /dev/accel* (or /dev/vfio/N); a user's JAX_PLATFORMS always wins, and a GPU
    plugin keeps jax's own choice (an explicit platform list would make a missing GPU an error)."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    if any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")):
        return
    import jax  # the entry points have imported it already; no backend has started yet

    jax.config.update("jax_platforms", "cpu")


def run(prog: str, main: Callable[[list[str]], int | None], config_flag=None) -> None:
    """Runs an entry point's `main(argv)` under absl with the project's error path: bad flags at parsing,
    errors of HANDLED from `main`, and a `--debug` flag (defined here if the module has none). On a CPU
    machine with libtpu installed, jax stays on the CPU (`_skip_libtpu_without_a_tpu`)."""
    _skip_libtpu_without_a_tpu()
    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool("debug", False, "On an error, show the traceback instead of one line.")
    app.run(guarded(prog, main, _debug_flag), flags_parser=flags_parser(prog, config_flag))
