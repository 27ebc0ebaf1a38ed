"""Encoder params -> a folder timm and the Hugging Face hub load: the release format.

MeFEm's released weights are flat timm `VisionTransformer` state dicts, and an export is exactly that:
`model.safetensors` + timm's hub `config.json` + a README model card (+ optionally MeFEm's own
`model.pth.tar`), a folder that `timm.create_model("local-dir:<folder>", pretrained=True)` loads with no
custom code. The key table lives in `timm_keys.py`; `python -m mefem_jax.export` is the command that
writes these folders, after `out_folder_refusal` has checked it may. torch is imported only to write
`.pth.tar`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util
from safetensors.numpy import save as safetensors_bytes

from mefem_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from mefem_jax.models.vit import VARIANTS, encoder_dims
from mefem_jax.weights.timm_keys import params_to_timm


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
# README.md from a user's, which it must never replace. It names the command, not this module, and
# must not change: the folders exported so far end with it.
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
# The model card's training section, from a run's saved config.
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Whether a folder may be written: an earlier export's files only, never a user's.
# ---------------------------------------------------------------------------------------------
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
