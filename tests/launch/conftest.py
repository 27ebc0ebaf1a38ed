"""The stand-in bin/ folders every launcher test runs against (helpers/launch_fakes.py)."""
from __future__ import annotations

import pytest

from helpers.launch_fakes import RECORDER, TRIPWIRE, Fakes


@pytest.fixture
def tripwires(tmp_path):
    return Fakes(tmp_path / "tripwires", TRIPWIRE)


@pytest.fixture
def recorders(tmp_path):
    return Fakes(tmp_path / "recorders", RECORDER)
