"""The repository root, for tests that run its commands (`python -m mefem_jax.X` with cwd=REPO) or read
its files; wherever in tests/ a test file sits."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
