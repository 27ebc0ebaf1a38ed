"""What the entry points do with bad input: one line on stderr and a documented exit status.

Schedulers read the status: 0 finished, 1 failed, 2 bad input (flags, config, data, workdir contents),
3 preempted after saving (train). `--debug` keeps the traceback instead of the line.
"""
from __future__ import annotations

import ast
import contextlib
import sys
from typing import Callable

from absl import flags

EXIT_FINISHED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PREEMPTED = 0, 1, 2, 3


def one_line(message: str) -> str:
    if "Traceback (most recent call last)" in message:  # absl embeds a config file's traceback
        lines = [line for line in message.splitlines() if line.strip()]
        message = f"{lines[0]} {lines[-1]}"
    return " ".join(message.split())


def flags_parser(prog: str, config_flag) -> Callable[[list[str]], list[str]]:
    """absl's flag parsing for `app.run(..., flags_parser=...)`, with a bad flag, a missing config file
    or a `--config.key` typo reported as one line (exit 2). ml_collections raises a raw AttributeError,
    in three chained tracebacks, for an unknown config key."""

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
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
