"""Training runs as weights sources: WORKDIR (its newest step), WORKDIR/checkpoints/N, or WORKDIR/selected
(the step its validation probes picked, with `eval.select`; training/kept_step.py writes it).

The Orbax checkpoints themselves are read by `training.checkpoint`; here a path is recognised as a run,
one of its steps or its selected step, and the params become the unrolled evaluation encoder, with the
run's saved config beside them (for the model card of an export).
"""
from __future__ import annotations

from pathlib import Path

from mefem_jax.models.vit import encoder_from_config, unstack_blocks
from mefem_jax.training import checkpoint, kept_step
from mefem_jax.weights.spec import LoadedEncoder, ModelSpecError, check_which, saved_model_config


SELECTED = "selected"  # WORKDIR/selected/{params, selected.json}


def is_selected_step(source: str) -> bool:
    """Whether `source` is a pretraining run's selected/ folder (local paths only)."""
    return "://" not in source and (Path(source) / f"{SELECTED}.json").is_file()


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
    cfg = saved_model_config(config["model"], dtype)
    local = "://" not in workdir
    step_dir = Path(workdir) / "checkpoints" / str(step)
    identity = {"kind": "workdir", "path": str(Path(workdir).resolve()) if local else workdir,
                "step": int(step), "which": which,
                "mtime_ns": step_dir.stat().st_mtime_ns if local and step_dir.exists() else None}
    # The run may have trained with scanned blocks; evaluation builds the unrolled encoder.
    return LoadedEncoder(encoder_from_config(cfg), unstack_blocks(params), cfg, identity, run_config=config,
                         run_dir=workdir)


def load_selected_encoder(folder: str, which: str = "target", dtype: str = "float32") -> LoadedEncoder:
    """The target encoder a pretraining run kept at its best probed step (WORKDIR/selected)."""
    check_which(which)
    if which != "target":
        raise ModelSpecError(f"{folder} keeps the target encoder only; --which=context needs a checkpoint "
                             "step (WORKDIR/checkpoints/N)")
    params, record = kept_step.read(Path(folder), SELECTED)
    if record.get("kind") != "pretraining" or "config" not in record:
        raise ModelSpecError(f"{folder}/{SELECTED}.json is not a pretraining run's selected step")
    config = record["config"]
    cfg = saved_model_config(config["model"], dtype)
    path = Path(folder).resolve()
    identity = {"kind": "selected", "path": str(path), "step": int(record["step"]), "which": which,
                "mtime_ns": (path / f"{SELECTED}.json").stat().st_mtime_ns,
                "selected_by": f"validation {record['select']} = {record['val'][record['select']]:.4g}"}
    return LoadedEncoder(encoder_from_config(cfg), unstack_blocks(params), cfg, identity, run_config=config,
                         run_dir=str(path.parent))
