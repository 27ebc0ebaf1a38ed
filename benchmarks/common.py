"""What every benchmark script shares: the repository root on sys.path, and configs read as train.py reads them.

The scripts run as `python benchmarks/NAME.py`, so this folder is first on sys.path and they import this
module (and each other) by bare name. Importing it puts the repository root on sys.path, once, ahead of
site-packages: what is timed is this checkout's `mefem_jax`, installed or not.
"""
from __future__ import annotations

import os
import sys

# The parser behind `config_flags.DEFINE_config_file`, i.e. train.py's --config (not re-exported by the package).
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def load_config(spec: str):
    """`configs/vits.py[:arg]` -> the ConfigDict that `--config=` of `python -m mefem_jax.train` gets.

    It loads the file and calls `get_config(arg)` (`get_config()` without `:arg`), and locks the result, as
    the flag does: a field the recipe does not have cannot be set by mistake. A relative path is taken from
    the repository root, not the working directory, so the benchmarks run from anywhere.
    """
    path, sep, arg = spec.partition(":")
    return ConfigFileFlagParser(name="config").parse(os.path.join(REPO, path) + sep + arg)
