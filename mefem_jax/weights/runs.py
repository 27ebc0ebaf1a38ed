"""Training runs as weights sources: WORKDIR (its newest step) or WORKDIR/checkpoints/N.

The Orbax checkpoints themselves are read by `training.checkpoint`; here a path is recognised as a run
or one of its steps, and a step's params become the unrolled evaluation encoder, with the run's saved
config beside them (for the model card of an export).
"""
from __future__ import annotations

from pathlib import Path

from mefem_jax.models.vit import encoder_from_config, unstack_blocks
from mefem_jax.training import checkpoint
from mefem_jax.weights.spec import LoadedEncoder, ModelSpecError, check_which, model_config


def _is_orbax_step(path: Path) -> bool:
    return path.is_dir() and (path / "_CHECKPOINT_METADATA").is_file()


def run_step(source: str) -> tuple[str, int | None] | None:
    """(workdir, step) when `source` is a training run or one of its checkpoint steps, else None.
    Remote paths (gs://) can only be runs: weights files are read from local disk."""
    path = Path(source)
    if "://" in source or (path / "checkpoints").is_dir():
        return source, None
    if _is_orbax_step(path):
        if not path.name.isdigit() or path.parent.name != "checkpoints":
            raise ModelSpecError(f"{path} is an Orbax checkpoint but not WORKDIR/checkpoints/<step>; "
                                 "pass the training workdir (and its step)")
        return str(path.parent.parent), int(path.name)
    return None


def load_run_encoder(workdir: str, which: str = "target", dtype: str = "float32",
                     step: int | None = None) -> LoadedEncoder:
    """A training run's encoder at `step` (default the newest); `run_config` is the run's saved config."""
    check_which(which)
    params, config, step = checkpoint.load_params_for_eval(workdir, which, step)
    saved = config["model"]
    cfg = model_config(saved["variant"], dtype, **{k: saved.get(k) for k in (
        "image_size", "patch_size", "posemb", "width", "depth", "heads")})
    local = "://" not in workdir
    step_dir = Path(workdir) / "checkpoints" / str(step)
    identity = {"kind": "workdir", "path": str(Path(workdir).resolve()) if local else workdir,
                "step": int(step), "which": which,
                "mtime_ns": step_dir.stat().st_mtime_ns if local and step_dir.exists() else None}
    # The run may have trained with scanned blocks; evaluation builds the unrolled encoder.
    return LoadedEncoder(encoder_from_config(cfg), unstack_blocks(params), cfg, identity, run_config=config,
                         run_dir=workdir)
