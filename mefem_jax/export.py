"""Command line: a training run (or any checkpoint the importer reads) -> a folder timm loads.

    python -m mefem_jax.export --workdir=WORKDIR --out=FOLDER [--which=target|context] [--step=N]
                               [--format=safetensors,pth] [--overwrite]
    python -m mefem_jax.export --checkpoint=WORKDIR/checkpoints/N --out=FOLDER
    python -m mefem_jax.export --checkpoint=WORKDIR/selected --out=FOLDER   # the step eval.select picked
    python -m mefem_jax.export --checkpoint=MeFEm-S.pth.tar|model.safetensors|FOLDER[:heads=H] --out=FOLDER
    python -m mefem_jax.export --workdir=FINETUNE_WORKDIR --out=FOLDER [--head|--nohead]

The weights are read through `weights/encoders.py` (a run through `weights/runs.py`) and the folder
(model.safetensors, config.json, a README model card, optionally model.pth.tar) is written by
`weights/release.py`, which documents the format. A fine-tune workdir (one with best/best.json) exports
its best encoder with the linear head, as the classifier folder of `weights/classifier.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

from mefem_jax import cli
from mefem_jax.weights.classifier import export_classifier_folder, finetune_card, finetuned_workdir, load_finetuned
from mefem_jax.weights.encoders import load_encoder
from mefem_jax.weights.release import EXPORT_FORMATS, export_folder, out_folder_refusal, training_card
from mefem_jax.weights.runs import load_run_encoder


def _define_flags() -> None:
    # Defined only when this file runs as a program, so importing it (tests, scripts) registers no
    # flags: absl refuses a flag defined twice, and other entry points also have --workdir.
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training run to export (its checkpoints/ folder).")
    flags.DEFINE_string("checkpoint", None,
                        "Instead of --workdir: one Orbax step folder (WORKDIR/checkpoints/N), or a weights "
                        "file / folder the importer reads (MeFEm .pth.tar, timm .safetensors or folder, "
                        "I-JEPA checkpoint); append :heads=H when the head count cannot be inferred.")
    flags.DEFINE_string("out", None, "Folder to write model.safetensors, config.json and README.md to.")
    flags.DEFINE_enum("which", "target", ["target", "context"],
                      "The EMA target encoder (what I-JEPA evaluates) or the online context encoder.")
    flags.DEFINE_integer("step", None, "With --workdir: the step to export (default: the newest).")
    flags.DEFINE_list("format", ["safetensors"],
                      f"Files to write, from {list(EXPORT_FORMATS)}: model.safetensors is always written, "
                      "'pth' adds MeFEm's model.pth.tar.")
    flags.DEFINE_bool("overwrite", False, "Replace the files of an earlier export in --out.")
    flags.DEFINE_bool("head", None, "A fine-tune workdir (best/best.json) exports its encoder with the linear "
                      "head (the default there); --head refuses any other source, --nohead exports the "
                      "fine-tuned encoder alone.")


def _load(source: str, which: str, step: int | None, from_run: bool):
    """(params, model config, model-card fields) of the encoder at `source` (see weights/encoders.py)."""
    if from_run:
        loaded = load_run_encoder(source, which, step=step)
    else:
        if source.startswith("random:"):
            raise ValueError(f"--checkpoint={source}: a random model has nothing to export")
        loaded = load_encoder(source, which)
    if loaded.run_config is not None:
        card = training_card(loaded.run_config, loaded.identity["step"], which, loaded.run_dir)
        if loaded.identity.get("selected_by"):  # WORKDIR/selected: the step the run's probes picked
            card["selected by"] = loaded.identity["selected_by"]
    else:
        card = {"source": source}
        if loaded.identity.get("notes"):
            card["conversion notes"] = "; ".join(loaded.identity["notes"])
    return loaded.params, loaded.model_cfg, card


def main(argv) -> None:
    """Bad flags, a refused --out, missing files, wrong steps and mismatched keys are one line and
    status 2, through cli.run."""
    from absl import app, flags
    from absl import logging as logging_absl

    logging_absl.set_verbosity(logging_absl.WARNING)  # Orbax narrates every restore at INFO
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if (FLAGS.workdir is None) == (FLAGS.checkpoint is None):
        raise app.UsageError("give exactly one of --workdir or --checkpoint")
    if FLAGS.out is None:
        raise app.UsageError("--out is required")
    if FLAGS.step is not None and FLAGS.workdir is None:
        raise app.UsageError("--step goes with --workdir; a --checkpoint folder names its own step")
    formats = tuple(dict.fromkeys(FLAGS.format))
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise app.UsageError(f"unknown --format {unknown or '(empty)'}; choose from {list(EXPORT_FORMATS)}")
    out = Path(FLAGS.out)
    refusal = out_folder_refusal(out, FLAGS.overwrite)
    if refusal:
        raise FileExistsError(refusal)
    if FLAGS.workdir is not None and not Path(FLAGS.workdir).is_dir() and "://" not in FLAGS.workdir:
        raise FileNotFoundError(f"--workdir {FLAGS.workdir} does not exist")
    source = FLAGS.workdir or FLAGS.checkpoint
    finetuned = finetuned_workdir(source, require=bool(FLAGS.head))
    if finetuned is None:
        params, model_cfg, card = _load(source, FLAGS.which, FLAGS.step, from_run=FLAGS.workdir is not None)
        export_folder(params, model_cfg, out, formats=formats, card=card)
    else:
        if FLAGS.step is not None or FLAGS["which"].present:
            raise app.UsageError("--step and --which do not apply to a fine-tune workdir: it exports best/")
        params, model_cfg, readout, outputs, best = load_finetuned(finetuned)
        card = finetune_card(best, finetuned)
        if FLAGS.head is False:
            export_folder(params["encoder"], model_cfg, out, formats=formats, card=card)
        else:
            export_classifier_folder(params, model_cfg, readout, outputs, out, card=card, formats=formats)
    if "pth" not in formats and (out / "model.pth.tar").exists():
        (out / "model.pth.tar").unlink()  # an earlier export's, no longer matching model.safetensors
    config = json.loads((out / "config.json").read_text())
    print(json.dumps({"out": str(out), "architecture": config["architecture"],
                      "model_args": config.get("model_args", {}), "num_classes": config["num_classes"],
                      "files": sorted(p.name for p in out.iterdir())}))


if __name__ == "__main__":
    _define_flags()
    cli.run("export", main)
