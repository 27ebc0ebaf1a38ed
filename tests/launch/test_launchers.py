"""Both launchers: shellcheck-clean, and --help prints usage without calling anything."""
from __future__ import annotations

import subprocess

import pytest

from helpers.launch_fakes import SLURM, TPU, find_shellcheck, run


@pytest.mark.parametrize("script", [TPU, SLURM, TPU.with_name("lib.sh")], ids=lambda p: p.name)
def test_launcher_passes_shellcheck(script):
    shellcheck = find_shellcheck()
    assert shellcheck, "shellcheck missing: it comes with the test extra (pip install -e '.[test]')"
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(script)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", [TPU, SLURM], ids=lambda p: p.name)
def test_help_prints_usage_and_exits_zero(script, tripwires):
    result = run(script, "-h", env=tripwires.env())
    assert result.returncode == 0
    assert result.stdout.startswith("Usage:")
    assert "--dry-run" in result.stdout
    assert tripwires.calls() == []
