"""Fixtures of the end-to-end tests: the commands run as subprocesses (helpers/runs.py)."""
from __future__ import annotations

import pytest

from helpers.runs import stop_started_runs, subprocess_env


@pytest.fixture(scope="session")
def train_env() -> dict:
    return subprocess_env()


@pytest.fixture(autouse=True)
def no_run_outlives_its_test():
    yield
    stop_started_runs()  # a test that failed while its run was going leaves nothing behind
