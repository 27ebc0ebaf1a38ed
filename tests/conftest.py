"""Session setup (the XLA cache, CPU only, the torchvision workaround) and the fixtures every wing uses.

Shared code that is not a fixture lives in `helpers/` (tiny configs, real faces, entry-point runs).
"""
from __future__ import annotations

import atexit
import csv
import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

# One persistent XLA compilation cache for the whole test session, inherited by the subprocesses the
# tests start (the training entry point, multi-device and multi-process runs). Many tests compile the
# same tiny train step; on a 2-core machine each compile costs 15-40 s and a cache hit ~2 s. It sits
# below jit's in-memory cache, so the tests that count traces and compilations still see every one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mefem_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The test extra installs libtpu (for test_compile_check.py, which compiles for TPU slices without one).
# Keep jax itself on the CPU in this process and in the entry points the tests start, so libtpu never
# probes for chips and adds its warnings to the stderr the tests read.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import numpy as np
import pytest

# Must run before any test module imports timm or torchvision: on machines with a CPU torch and
# a CUDA torchvision build that import fails otherwise (docs/PLATFORM_NOTES.md).
if importlib.util.find_spec("torch") is not None:
    import torch

    if torch.version.cuda is None:
        from mefem_jax.weights.timm_import import declare_torchvision_ops

        declare_torchvision_ops()

from helpers.faces import load_faces, require_utkface  # noqa: E402 - after the environment above
from helpers.tiny_configs import tiny_model_config  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes long; excluded from CI (-m 'not slow')")


@pytest.fixture(scope="session")
def utkface_dir() -> Path:
    """The UTKFace crops shared beside the repository (never copied into it)."""
    return require_utkface()


@pytest.fixture(scope="session")
def faces(utkface_dir):
    """faces(n, size) -> float32 [n, size, size, 3]: the first n test-split faces of labels.csv,
    resized (bicubic) and ImageNet-normalised, as a timm user would feed them."""
    with open(utkface_dir / "labels.csv", newline="") as f:
        files = [row["file"] for row in csv.DictReader(f) if row["split"] == "test"]

    def load(n: int, size: int) -> np.ndarray:
        return load_faces([utkface_dir / "images" / name for name in files[:n]], size)

    return load


@pytest.fixture
def model_cfg():
    """model_cfg(**fields) -> the `model` ConfigDict (helpers.tiny_configs.tiny_model_config): a 2-block
    width-64 encoder on 112 px images (7x7 grid), small enough for the CPU."""
    return tiny_model_config


@pytest.fixture
def random_params():
    """random_params(params, seed): every leaf made non-trivial, so a conversion test exercises
    each one (fresh init has zero biases and unit LayerNorm scales, which hide transposes)."""
    from flax import traverse_util

    def make(params, seed: int = 0):
        rng = np.random.default_rng(seed)
        flat = traverse_util.flatten_dict(params, sep="/")
        out = {}
        for path, leaf in flat.items():
            noise = rng.standard_normal(leaf.shape).astype(np.float32)
            if path.endswith("scale"):
                out[path] = 1.0 + 0.2 * noise
            elif path.endswith("bias"):
                out[path] = 0.1 * noise
            else:
                out[path] = 0.05 * noise
        return jax.tree_util.tree_map(np.asarray, traverse_util.unflatten_dict(out, sep="/"))

    return make


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, *inputs):
    return model.apply({"params": params}, *inputs)


@pytest.fixture(scope="session")
def forward():
    """forward(model, params, *inputs) -> numpy: `model.apply` jitted, at "highest" matmul
    precision (parity tests). One jitted function for all test files, so a model that two
    files use (ViT-Ti at 224) compiles once per session: compiling beats op-by-op dispatch."""
    def run(model, params, *inputs):
        with jax.default_matmul_precision("highest"):
            return np.asarray(_apply(model, params, *inputs))

    return run
