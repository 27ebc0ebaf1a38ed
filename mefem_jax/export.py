"""Encoder params -> a folder timm and the Hugging Face hub load: the release format.

MeFEm's released weights are flat timm `VisionTransformer` state dicts, and an export is exactly that:
`model.safetensors` + timm's hub `config.json` + a README model card (+ optionally MeFEm's own
`model.pth.tar`), a folder that `timm.create_model("local-dir:<folder>", pretrained=True)` loads with no
custom code. The key table lives in `models/timm_keys.py`; every source of weights is read through
`encoders.py`. torch is imported only to write `.pth.tar`.

From the command line (see `main` at the bottom):

    python -m mefem_jax.export --workdir=RUN --out=FOLDER [--which=target|context] [--step=N]
                               [--format=safetensors,pth]
    python -m mefem_jax.export --checkpoint=RUN/checkpoints/N | FILE[:heads=H] --out=FOLDER
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util
from safetensors.numpy import save as safetensors_bytes

from mefem_jax.weights import encoders
from mefem_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from mefem_jax.weights.timm_keys import params_to_timm
from mefem_jax.models.vit import VARIANTS, encoder_dims


def save_pth(state_dict: Mapping[str, np.ndarray], path: str | Path) -> None:
    """torch.save a flat dict of arrays as torch tensors (MeFEm's `.pth.tar` format)."""
    import torch  # torch is optional (the `torch` extra) and slow to import: only for this format
    torch.save({k: torch.tensor(np.asarray(v)) for k, v in state_dict.items()}, str(path))  # copies


# ---------------------------------------------------------------------------------------------
# Writing a timm / Hugging Face folder.
# ---------------------------------------------------------------------------------------------
_TIMM_SIZE_NAMES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large"}


def timm_architecture(model_cfg) -> tuple[str, dict[str, Any]]:
    """timm model name and the `model_args` that turn it into the configured encoder.

    The name is always the variant's `vit_<size>_patch16_224`; any departure (patch, image
    size, width/depth/heads overrides) goes into model_args, which timm applies on creation.
    """
    name = f"vit_{_TIMM_SIZE_NAMES[model_cfg.variant]}_patch16_224"
    width, depth, heads = encoder_dims(model_cfg)
    args: dict[str, Any] = {}
    if model_cfg.image_size != 224:
        args["img_size"] = model_cfg.image_size
    if model_cfg.patch_size != 16:
        args["patch_size"] = model_cfg.patch_size
    if (width, depth, heads) != VARIANTS[model_cfg.variant]:
        args.update(embed_dim=width, depth=depth, num_heads=heads)
    return name, args


def timm_config(model_cfg) -> dict[str, Any]:
    """The `config.json` timm's hub / local-dir loader reads (headless, CLS pooling)."""
    name, args = timm_architecture(model_cfg)
    width, _, _ = encoder_dims(model_cfg)
    size = model_cfg.image_size
    config: dict[str, Any] = {
        "architecture": name,
        "num_classes": 0,
        "num_features": width,
        "global_pool": "token",
        "pretrained_cfg": {
            "tag": "mefem_jax",
            "custom_load": False,
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,  # the inputs are face crops already; do not crop further
            "crop_mode": "center",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    if args:
        config["model_args"] = args
    return config


def model_card(model_cfg, card: Mapping[str, Any] | None = None) -> str:
    """README.md for the exported folder. `card`: free fields (data, steps, which, ...)."""
    card = dict(card or {})
    name, args = timm_architecture(model_cfg)
    width, depth, heads = encoder_dims(model_cfg)
    size = model_cfg.image_size
    kwargs = "".join(f", {k}={v!r}" for k, v in args.items())  # as create_model arguments
    overrides = ", ".join(f"`{k}={v}`" for k, v in args.items())
    title = card.pop("title", f"MeFEm-{model_cfg.variant} (mefem_jax)")
    lines = [
        "---", "library_name: timm", "tags: [image-feature-extraction, timm, face]", "---", "",
        f"# {title}", "",
        "A ViT face-embedding encoder pretrained with MeFEm-style I-JEPA (axial-stripe masking, "
        "circular loss weighting, probabilistic CLS reassignment), trained with mefem_jax and "
        "exported as a plain timm state dict.", "",
        "## Model", "",
        f"- architecture: `{name}`" + (f" with {overrides}" if args else ""),
        f"- width {width}, depth {depth}, heads {heads}, patch {model_cfg.patch_size}, "
        f"input {size}x{size}, position embedding: {model_cfg.posemb}",
        "- no classifier head; the embedding is the final-LayerNormed CLS token (`global_pool=\"token\"`)",
    ]
    if card:
        lines += ["", "## Training", ""]
        lines += [f"- {k}: {v}" for k, v in card.items()]
    lines += [
        "", "## Use with timm", "",
        "Inputs: RGB face crops resized to "
        f"{size}x{size}, scaled to [0, 1] and normalised with the ImageNet mean "
        f"{list(IMAGENET_MEAN)} and std {list(IMAGENET_STD)}.", "",
        "```python",
        "import timm",
        "model = timm.create_model(\"local-dir:/path/to/this/folder\", pretrained=True)",
        "# or, from the weights file alone:",
        f"model = timm.create_model(\"{name}\", pretrained=True, num_classes=0, global_pool=\"token\"{kwargs},",
        "                          pretrained_cfg_overlay=dict(file=\"/path/to/model.safetensors\"))",
        "embedding = model(images)  # [B, %d] CLS features" % width,
        "```", "",
    ]
    return "\n".join(lines)


EXPORT_FORMATS = ("safetensors", "pth")
EXPORT_FILES = ("model.safetensors", "model.pth.tar", "config.json", "README.md")
# Ends every model card we write (invisible when rendered): how a later export tells its own
# README.md from a user's, which it must never replace.
CARD_MARK = "<!-- written by mefem_jax.export -->"


def export_folder(params: Mapping, model_cfg, out_dir: str | Path,
                  formats: Iterable[str] = ("safetensors",),
                  card: Mapping[str, Any] | None = None) -> Path:
    """Write a timm-loadable folder: model.safetensors (always), config.json, README.md, and
    model.pth.tar (MeFEm's format) when "pth" is in `formats`. Returns the folder."""
    formats = tuple(formats)
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {EXPORT_FORMATS}")
    state_dict = params_to_timm(params, model_cfg)  # validates before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # timm reads safetensors regardless of the format tag; "pt" is what HF tooling expects.
    # Bytes written through Python, not safetensors' save_file: that creates the file 0600, unlike
    # the other files here (0644 under the usual umask), and a shared release folder must be readable.
    (out_dir / "model.safetensors").write_bytes(safetensors_bytes(state_dict, metadata={"format": "pt"}))
    if "pth" in formats:
        save_pth(state_dict, out_dir / "model.pth.tar")
    (out_dir / "config.json").write_text(json.dumps(timm_config(model_cfg), indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(model_cfg, card) + CARD_MARK + "\n")
    return out_dir


# ---------------------------------------------------------------------------------------------
# Command line: a training run (or any checkpoint the importer reads) -> a timm folder.
#
#   python -m mefem_jax.export --workdir=WORKDIR --out=FOLDER [--which=target|context] [--step=N]
#                              [--format=safetensors,pth] [--overwrite]
#   python -m mefem_jax.export --checkpoint=WORKDIR/checkpoints/N --out=FOLDER
#   python -m mefem_jax.export --checkpoint=MeFEm-S.pth.tar|model.safetensors|FOLDER[:heads=H] --out=FOLDER
# ---------------------------------------------------------------------------------------------
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


def _describe(section: Mapping[str, Any]) -> str:
    """{'a': 1, 'b': {'c': 2}} -> 'a=1, b.c=2' for the model card."""
    flat = traverse_util.flatten_dict(dict(section), sep=".")
    return ", ".join(f"{k}={v}" for k, v in sorted(flat.items()))


def training_card(config: Mapping[str, Any], step: int, which: str, source: str) -> dict[str, str]:
    """Model-card fields describing how an encoder was trained, from the run's saved config."""
    data, mask, loss, optim = config["data"], config["mask"], config["loss"], config["optim"]
    strategy = mask["strategy"]
    batch = int(data["batch_size"])
    loss_rest = {k: v for k, v in loss.items() if not isinstance(v, Mapping)}
    return {
        "encoder": "target (EMA) encoder" if which == "target" else "context (online) encoder",
        "source": f"{source}, step {step}",
        "training data": str(data["train"]),
        "steps": f"{step} of {config['total_steps']} at global batch {batch} ({step * batch:,} images seen)",
        "mask strategy": f"{strategy} ({_describe(mask.get(strategy, {}))})",
        "loss": _describe(loss_rest),
        "circular loss weighting": _describe(loss.get("circular", {})),
        "CLS reassignment": _describe(loss.get("cls", {})),
        "predictor": _describe(config["predictor"]),
        "optimiser": "AdamW, " + _describe(optim),
        "seed": str(config.get("seed")),
    }


def _load(source: str, which: str, step: int | None, from_run: bool):
    """(params, model config, model-card fields) of the encoder at `source` (see encoders.py)."""
    if from_run:
        loaded = encoders.load_run_encoder(source, which, step=step)
    else:
        if source.startswith("random:"):
            raise ValueError(f"--checkpoint={source}: a random model has nothing to export")
        loaded = encoders.load_encoder(source, which)
    if loaded.run_config is not None:
        card = training_card(loaded.run_config, loaded.identity["step"], which, loaded.run_dir)
    else:
        card = {"source": source}
        if loaded.identity.get("notes"):
            card["conversion notes"] = "; ".join(loaded.identity["notes"])
    return loaded.params, loaded.model_cfg, card


def _written_by_us(path: Path) -> bool:
    """Whether an existing config.json / README.md is one an earlier export wrote."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.name == "README.md":
            return text.rstrip().endswith(CARD_MARK)
        return json.loads(text).get("pretrained_cfg", {}).get("tag") == "mefem_jax"
    except (OSError, ValueError, AttributeError):  # unreadable, not UTF-8, not JSON, not a dict
        return False


def out_folder_refusal(out: Path, overwrite: bool) -> str | None:
    """Why the export must not write into `out`, or None when it may.

    A new or empty folder is fine. A non-empty one only when it holds an earlier export (its model
    files or our config.json) and --overwrite is given, and then only if every file the export
    would replace is ours: the user's README.md or config.json is never replaced.
    """
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    if not out.is_dir() or not any(out.iterdir()):
        return None
    present = [n for n in EXPORT_FILES if (out / n).exists()]
    ours = [n for n in present if n.startswith("model.") or _written_by_us(out / n)]
    if not any(n.startswith("model.") or n == "config.json" for n in ours):
        return f"{out} is not empty and holds no earlier export; pick a new or empty --out"
    foreign = [n for n in present if n not in ours]
    if foreign:
        return f"{out}/{foreign[0]} was not written by an export and would be replaced; move it or pick another --out"
    if not overwrite:
        return f"{out} already holds an export ({', '.join(present)}); pass --overwrite to replace it"
    return None


def main(argv) -> None:
    from absl import app
    from absl import flags
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
        raise SystemExit(f"export: {refusal}")

    try:
        if FLAGS.workdir is not None and not Path(FLAGS.workdir).is_dir() and "://" not in FLAGS.workdir:
            raise FileNotFoundError(f"--workdir {FLAGS.workdir} does not exist")
        params, model_cfg, card = _load(FLAGS.workdir or FLAGS.checkpoint, FLAGS.which, FLAGS.step,
                                        from_run=FLAGS.workdir is not None)
        export_folder(params, model_cfg, out, formats=formats, card=card)
        if "pth" not in formats and (out / "model.pth.tar").exists():
            (out / "model.pth.tar").unlink()  # an earlier export's, no longer matching model.safetensors
    except (OSError, ValueError) as e:  # missing files, wrong steps, mismatched keys: say what, no traceback
        raise SystemExit(f"export failed: {type(e).__name__}: {e}") from None
    name, args = timm_architecture(model_cfg)
    print(json.dumps({"out": str(out), "architecture": name, "model_args": args,
                      "files": sorted(p.name for p in out.iterdir())}))


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
