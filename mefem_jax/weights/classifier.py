"""A fine-tuned encoder with its linear head, as a timm release: the classifier format.

A fine-tune (`python -m mefem_jax.finetune`) trains `{"encoder": <ViT params>, "head": {"kernel": [D, K],
"bias": [K]}}` (the head may also hold its input standardisation, `input_mean` / `input_std` [D],
folded into the exported Linear); the head reads one feature of the encoder's final-LayerNormed tokens, the `readout`:
"cls" (token 0) or "mean" (the mean of the patch tokens 1..N). Its logit columns are described by
`outputs`, a list in column order:

    {"name": "age", "kind": "regression", "index": 0, "size": 1, "mean": 33.3, "std": 19.9}
    {"name": "gender", "kind": "classification", "index": 1, "size": 2, "classes": ["0", "1"]}

A regression column is standardised: the value in the target's units is `logit * std + mean`.

The export is release.py's folder (model.safetensors, timm's config.json, a README card) with the head
as timm's `head.weight` / `head.bias`, the readout as timm's pooling, and the outputs in config.json
(`mefem_outputs`, plus timm's own `label_names` / `label_descriptions`): `timm.create_model(
"local-dir:FOLDER", pretrained=True)` gives the same logits, with no custom code. A fine-tune workdir
holds the model to export in `best/`: `best/params` (Orbax StandardCheckpointer) and `best/best.json`
(step, readout, model config, outputs, validation metrics, init spec), read by `load_finetuned`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from safetensors.numpy import save as safetensors_bytes

from mefem_jax.models.vit import encoder_dims, unstack_blocks
from mefem_jax.weights.release import CARD_MARK, EXPORT_FORMATS, save_pth, timm_architecture, timm_config
from mefem_jax.weights.spec import saved_model_config
from mefem_jax.weights.timm_keys import ConversionError, params_to_timm, to_float32

# readout -> timm's `global_pool`. Both keep `fc_norm=False` (see classifier_timm_config).
READOUT_POOL = {"cls": "token", "mean": "avg"}
OUTPUT_KINDS = ("regression", "classification")
STANDARDISATION = ("input_mean", "input_std")  # a head's input standardisation (finetuning/model.py)
BEST_DIR, BEST_JSON, BEST_PARAMS = "best", "best.json", "params"


def check_readout(readout: str) -> str:
    if readout not in READOUT_POOL:
        raise ValueError(f"readout must be one of {list(READOUT_POOL)}, got {readout!r}")
    return readout


# ---------------------------------------------------------------------------------------------
# The outputs description.
# ---------------------------------------------------------------------------------------------
def _json_scalar(value):
    """numpy scalars (a mean or std computed with numpy) as Python numbers; anything else is refused."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r}")


def check_outputs(outputs: Iterable[Mapping[str, Any]], num_classes: int | None = None) -> list[dict]:
    """The outputs as plain JSON dicts, checked: every problem listed at once (ConversionError).

    The columns must tile 0..K-1 in order (a user slices logits by `index` and `size`), and with
    `num_classes` given, K must be the head's width.
    """
    try:  # a JSON round trip: plain copies, and anything config.json could not hold fails here
        outputs = json.loads(json.dumps(list(outputs), default=_json_scalar))
    except (TypeError, ValueError) as e:
        raise ConversionError("invalid outputs description", [f"not JSON-serialisable: {e}"]) from None
    problems, column, labels = [], 0, []
    if not outputs:
        problems.append("no outputs: a head needs at least one column")
    for i, out in enumerate(outputs):
        if not isinstance(out, dict):
            problems.append(f"outputs[{i}] is {type(out).__name__}, not a dict")
            continue
        name, kind, size = out.get("name"), out.get("kind"), out.get("size")
        where = f"outputs[{i}] ({name})"
        if not isinstance(name, str) or not name:
            problems.append(f"outputs[{i}]: 'name' must be a non-empty string, got {name!r}")
        if kind not in OUTPUT_KINDS:
            problems.append(f"{where}: 'kind' must be one of {list(OUTPUT_KINDS)}, got {kind!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            problems.append(f"{where}: 'size' must be a positive integer, got {size!r}")
            continue
        if out.get("index") != column:
            problems.append(f"{where}: 'index' is {out.get('index')!r}; the columns before it end at {column}")
        if kind == "regression":
            if size != 1:
                problems.append(f"{where}: a regression output has size 1, got {size}")
            for key in ("mean", "std"):
                if not isinstance(out.get(key), (int, float)) or isinstance(out.get(key), bool):
                    problems.append(f"{where}: a regression output needs a numeric '{key}', got {out.get(key)!r}")
            labels.append(str(name))
        elif kind == "classification":
            classes = out.get("classes")
            if not isinstance(classes, list) or len(classes) != size:
                problems.append(f"{where}: 'classes' must list {size} class name(s), got {classes!r}")
            else:
                labels += [f"{name}={c}" for c in classes]
        column += size
    if num_classes is not None and column != num_classes and not problems:
        problems.append(f"the outputs describe {column} column(s); the head has {num_classes}")
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:  # timm's label_names must be unique
        problems.append(f"column names repeat: {duplicated}")
    if problems:
        raise ConversionError("invalid outputs description", problems)
    return outputs


def label_names(outputs: list[dict]) -> list[str]:
    """One name per logit column (timm's `label_names`): 'age', 'gender=0', 'gender=1', ..."""
    names = []
    for out in outputs:
        names += [out["name"]] if out["kind"] == "regression" else [f"{out['name']}={c}" for c in out["classes"]]
    return names


def _columns(out: Mapping[str, Any]) -> str:
    start, size = out["index"], out["size"]
    return str(start) if size == 1 else f"{start}-{start + size - 1}"


def label_descriptions(outputs: list[dict]) -> dict[str, str]:
    """Column name -> how to read that column (timm's `label_descriptions`)."""
    described = {}
    for out in outputs:
        if out["kind"] == "regression":
            described[out["name"]] = (f"{out['name']}, regression, standardised: value = logit * {out['std']} "
                                      f"+ {out['mean']}")
        else:
            for c in out["classes"]:
                described[f"{out['name']}={c}"] = (f"{out['name']}, class {c}: softmax over columns "
                                                   f"{_columns(out)}")
    return described


# ---------------------------------------------------------------------------------------------
# config.json and the state dict.
# ---------------------------------------------------------------------------------------------
def classifier_timm_config(model_cfg, readout: str, outputs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """release.timm_config with the head: K classes, the readout as timm's pooling, the outputs.

    timm's VisionTransformer (1.0.x) pools in `forward_head`: `global_pool="token"` takes token 0,
    `"avg"` the mean of tokens `num_prefix_tokens:` (the patch tokens; the CLS token is the one prefix
    token). Its final LayerNorm sits before the pooling as `norm` unless `fc_norm` is on, and `fc_norm`
    defaults to on for "avg" (LayerNorm of the mean, not the mean of normed tokens, and no `norm.*`
    keys), so `fc_norm=False` is stated for both readouts. They go in `model_args`: the only part of
    config.json that timm's local-dir / hub loader passes to the model (top-level `global_pool` is
    informational there).
    """
    check_readout(readout)
    outputs = check_outputs(outputs)
    num_classes = sum(out["size"] for out in outputs)
    pool = READOUT_POOL[readout]
    config = timm_config(model_cfg)
    config.update(num_classes=num_classes, global_pool=pool)
    config["pretrained_cfg"]["num_classes"] = num_classes
    config["model_args"] = {**config.get("model_args", {}), "global_pool": pool, "fc_norm": False}
    # timm moves these two into pretrained_cfg on loading (model.pretrained_cfg["label_names"]).
    config["label_names"] = label_names(outputs)
    config["label_descriptions"] = label_descriptions(outputs)
    config["mefem_readout"] = readout
    config["mefem_outputs"] = outputs
    return config


def fold_standardisation(head: Mapping) -> dict:
    """A head with an input standardisation -> the plain Linear on the raw feature that computes the
    same logits (float64 arithmetic, float32 out); a plain head is returned as it is.

        ((x - mean) / std) @ W + b  =  x @ (W / std) + (b - (mean / std) @ W)"""
    if not set(STANDARDISATION) <= set(head):
        return {"kernel": head["kernel"], "bias": head["bias"]}
    kernel, bias = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
    mean, std = (np.asarray(head[k], np.float64) for k in STANDARDISATION)
    return {"kernel": (kernel / std[:, None]).astype(np.float32),
            "bias": (bias - (mean / std) @ kernel).astype(np.float32)}


def classifier_state_dict(params: Mapping, model_cfg) -> dict[str, np.ndarray]:
    """Fine-tuned params -> flat float32 timm state dict: the encoder's keys, then `head.weight` (K, D)
    and `head.bias` (K,), timm's order. Every problem is listed at once (ConversionError)."""
    if not isinstance(params, Mapping) or not {"encoder", "head"} <= set(params):
        held = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ConversionError("cannot export a classifier",
                              [f"the params hold {held}; a fine-tuned model has 'encoder' and 'head'"])
    problems = [f"unexpected parameter {k} (a fine-tuned model has 'encoder' and 'head')"
                for k in params if k not in ("encoder", "head")]
    try:
        state_dict = params_to_timm(params["encoder"], model_cfg)
    except ConversionError as e:
        problems += [f"encoder: {p}" for p in e.problems]
        state_dict = {}
    head = params["head"]
    width, _, _ = encoder_dims(model_cfg)
    keys = set(head) if isinstance(head, Mapping) else set()
    if keys not in ({"kernel", "bias"}, {"kernel", "bias", *STANDARDISATION}):
        problems.append(f"head holds {sorted(keys)}; a linear head has ['bias', 'kernel'] "
                        f"(and with an input standardisation {list(STANDARDISATION)})")
    elif keys != {"kernel", "bias"} and any(np.shape(head[k]) != (width,) for k in STANDARDISATION):
        problems.append(f"head/{'/'.join(STANDARDISATION)}: shapes {[np.shape(head[k]) for k in STANDARDISATION]}, "
                        f"the head reads width {width}")
    else:
        kernel, bias = np.shape(head["kernel"]), np.shape(head["bias"])
        if len(kernel) != 2 or kernel[0] != width:
            problems.append(f"head/kernel: shape {kernel}, the head reads width {width}: ({width}, K)")
        elif bias != kernel[1:]:
            problems.append(f"head/bias: shape {bias}, the kernel has {kernel[1]} column(s)")
        else:
            folded = fold_standardisation(head)
            kernel, bias = to_float32(folded["kernel"]), to_float32(folded["bias"])
            state_dict["head.weight"] = np.ascontiguousarray(kernel.T)  # Flax (in, out) = torch weight.T
            state_dict["head.bias"] = np.ascontiguousarray(bias)
    if problems:
        raise ConversionError("cannot export these parameters", problems)
    return state_dict


# ---------------------------------------------------------------------------------------------
# The folder.
# ---------------------------------------------------------------------------------------------
def _identifier(name: str) -> str:
    """A Python variable name for an output in the card's snippet."""
    word = re.sub(r"\W+", "_", name).strip("_") or "output"
    return f"_{word}" if word[0].isdigit() else word


def classifier_card(model_cfg, readout: str, outputs: list[dict], card: Mapping[str, Any] | None = None) -> str:
    """README.md for an exported classifier: the model, each logit column and how to decode it."""
    card = dict(card or {})
    name, args = timm_architecture(model_cfg)
    width, depth, heads = encoder_dims(model_cfg)
    size, num_classes = model_cfg.image_size, sum(out["size"] for out in outputs)
    title = card.pop("title", f"MeFEm-{model_cfg.variant} fine-tuned: {', '.join(o['name'] for o in outputs)}")
    overrides = ", ".join(f"`{k}={v}`" for k, v in args.items())
    feature = ("the final-LayerNormed CLS token (`global_pool=\"token\"`)" if readout == "cls" else
               "the mean of the final-LayerNormed patch tokens, CLS excluded (`global_pool=\"avg\"` with "
               "`fc_norm=False`: timm's final norm stays before the pooling)")
    lines = [
        "---", "library_name: timm", "tags: [image-classification, timm, face]", "---", "",
        f"# {title}", "",
        "A ViT face encoder pretrained with MeFEm-style I-JEPA and fine-tuned with mefem_jax together with "
        "a linear head, exported as a plain timm state dict (no custom code).", "",
        "## Model", "",
        f"- architecture: `{name}`" + (f" with {overrides}" if args else ""),
        f"- width {width}, depth {depth}, heads {heads}, patch {model_cfg.patch_size}, "
        f"input {size}x{size}, position embedding: {model_cfg.posemb}",
        f"- head: `Linear({width}, {num_classes})` on {feature}",
        "", "## Outputs", "",
        "The logit columns, also in config.json under `mefem_outputs` (and timm's `label_names`):", "",
        "| columns | output | kind | decoding |", "|---|---|---|---|",
    ]
    for out in outputs:
        if out["kind"] == "regression":
            decode = f"standardised: value = logit * {out['std']} + {out['mean']}"
        else:
            decode = f"softmax over the columns; classes {out['classes']}"
        lines.append(f"| {_columns(out)} | {out['name']} | {out['kind']} | {decode} |")
    if card:
        lines += ["", "## Training", ""]
        lines += [f"- {k}: {v}" for k, v in card.items()]
    lines += [
        "", "## Use with timm", "",
        f"Inputs: RGB face crops resized to {size}x{size}, scaled to [0, 1] and normalised with the ImageNet "
        "mean and std (for square crops, timm's data config from this folder does just that).", "",
        "```python",
        "import timm",
        "import torch",
        "from timm.data import create_transform, resolve_data_config",
        "",
        "model = timm.create_model(\"local-dir:/path/to/this/folder\", pretrained=True).eval()",
        "transform = create_transform(**resolve_data_config({}, model=model))",
        "images = torch.stack([transform(image) for image in pil_images])",
        "with torch.no_grad():",
        f"    logits = model(images)  # [B, {num_classes}]",
    ]
    for out in outputs:
        var, start, stop = _identifier(out["name"]), out["index"], out["index"] + out["size"]
        if out["kind"] == "regression":
            lines.append(f"{var} = logits[:, {start}] * {out['std']} + {out['mean']}  # un-standardised")
        else:
            lines += [f"{var}_probs = logits[:, {start}:{stop}].softmax(-1)  # over {out['classes']}",
                      f"{var} = [{out['classes']!r}[i] for i in {var}_probs.argmax(-1)]"]
    lines += ["```", ""]
    return "\n".join(lines)


def export_classifier_folder(params: Mapping, model_cfg, readout: str, outputs: Iterable[Mapping[str, Any]],
                             out_dir: str | Path, card: Mapping[str, Any] | None = None,
                             formats: Iterable[str] = ("safetensors",)) -> Path:
    """Write a timm-loadable classifier folder: model.safetensors (always), config.json, README.md, and
    MeFEm's model.pth.tar when "pth" is in `formats`. Everything is checked before anything is written.
    Returns the folder."""
    formats = tuple(formats)
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {EXPORT_FORMATS}")
    state_dict = classifier_state_dict(params, model_cfg)
    config = classifier_timm_config(model_cfg, readout, outputs)
    check_outputs(config["mefem_outputs"], num_classes=state_dict["head.bias"].shape[0])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # As release.export_folder: the bytes through Python (0644 under the usual umask, where
    # safetensors' save_file makes 0600), "pt" format for HF tooling.
    (out_dir / "model.safetensors").write_bytes(safetensors_bytes(state_dict, metadata={"format": "pt"}))
    if "pth" in formats:
        save_pth(state_dict, out_dir / "model.pth.tar")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # CARD_MARK: a later export with --overwrite recognises the card as its own (release.out_folder_refusal).
    readme = classifier_card(model_cfg, readout, config["mefem_outputs"], card)
    (out_dir / "README.md").write_text(readme + CARD_MARK + "\n")
    return out_dir


# ---------------------------------------------------------------------------------------------
# Reading a fine-tune workdir.
# ---------------------------------------------------------------------------------------------
def _epath(path):
    from etils import epath  # Orbax's path type (gs:// too); imported with orbax, only where read

    return epath.Path(path)


def finetuned_workdir(source: str, require: bool = False) -> str | None:
    """`source` (a fine-tune workdir, or its best/ folder) as the workdir, when it holds best/best.json;
    else None, or with `require` (a head export was asked for) one line saying there is no head."""
    path = _epath(source)
    if path.name == BEST_DIR and (path / BEST_JSON).exists():
        return str(path.parent)
    if (path / BEST_DIR / BEST_JSON).exists():
        return str(path)
    if require:
        raise ValueError(f"{source} holds no fine-tuned head (no {BEST_DIR}/{BEST_JSON}); a head is exported "
                         "from a fine-tune workdir (python -m mefem_jax.finetune)")
    return None


def load_finetuned(workdir: str | Path):
    """(params, model_cfg, readout, outputs, best) from a fine-tune workdir's best/ folder.

    params: `{"encoder": <unrolled blocks_i>, "head": {...}}` as host numpy arrays; model_cfg: the
    evaluation schema (weights/spec.model_config, unrolled blocks) with best.json's architecture;
    best: best.json itself (step, val, init, ...).
    """
    from mefem_jax.training import kept_step  # Orbax: heavy, and only this reader needs it

    local = "://" not in str(workdir)
    best_dir = _epath(Path(workdir).absolute() if local else workdir) / BEST_DIR
    if not (best_dir / BEST_JSON).exists():
        raise FileNotFoundError(f"{workdir} is not a fine-tune workdir: no {BEST_DIR}/{BEST_JSON}")
    params, best = kept_step.read(best_dir, BEST_DIR)  # host arrays, whatever mesh saved them
    missing = [k for k in ("readout", "model", "outputs") if k not in best]
    if missing:
        raise ValueError(f"{best_dir / BEST_JSON} lacks {missing}")
    readout = check_readout(best["readout"])
    model_cfg = saved_model_config(best["model"], best["model"].get("dtype", "float32"))
    if not isinstance(params.get("encoder"), Mapping):
        raise ConversionError(f"{best_dir / BEST_PARAMS} is not a fine-tuned model",
                              [f"it holds {sorted(params)}; a fine-tuned model has 'encoder' and 'head'"])
    params["encoder"] = unstack_blocks(params["encoder"])  # a scanned fine-tune, to the export layout
    return params, model_cfg, readout, best["outputs"], best


def finetune_card(best: Mapping[str, Any], workdir: str) -> dict[str, str]:
    """Model-card fields for a fine-tune: where it came from and how it scored on validation."""
    card = {"source": f"{workdir}, best step {best.get('step')}"}
    if best.get("init"):
        card["initialised from"] = str(best["init"])
    card["readout"] = str(best["readout"])
    if best.get("select"):
        card["selected by"] = f"validation {best['select']}"
    if best.get("val"):
        card["validation"] = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in sorted(best["val"].items()))
    return card
