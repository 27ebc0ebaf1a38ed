"""Encoder parameters <-> timm ViT state dicts: one key table, both directions, and the files.

MeFEm's released weights are flat timm `VisionTransformer` state dicts, so that is the
interchange format here:

* `KEY_TABLE` maps every encoder parameter path to its timm key with a transform kind; it
  is used to export (JAX -> timm) and to import (timm -> JAX). Nothing else knows key names.
* `params_to_timm` / `timm_to_params` convert in memory. Both check the input against the
  complete layout of the configured model and raise one `ConversionError` that lists every
  unknown, missing and mis-shaped key, rather than stopping at the first.
* `load_encoder_params` reads a MeFEm `.pth.tar`, a timm folder / `.safetensors` file, or an
  official I-JEPA checkpoint; `export_folder` writes `model.safetensors` + timm's hub
  `config.json` + a README model card (+ optionally a MeFEm-style `model.pth.tar`), a folder
  that `timm.create_model("local-dir:<folder>", pretrained=True)` loads with no custom code.

`params` here is the encoder's parameter tree, i.e. `variables["params"]` of `ViT.init`.
torch is optional: it is imported only by the `.pth` readers/writers and by `import_timm`.

From the command line (see `main` at the bottom):

    python -m mefem_jax.export --workdir=RUN --out=FOLDER [--which=target|context] [--step=N]
                               [--format=safetensors,pth]
    python -m mefem_jax.export --checkpoint=RUN/checkpoints/N | FILE[:heads=H] --out=FOLDER
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mefem_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from mefem_jax.models.vit import (VARIANTS, encoder_dims, encoder_from_config, sincos_pos_embed, stack_blocks,
                                  trunc_normal, unstack_blocks)

logger = logging.getLogger(__name__)

# An imported sin-cos model must find this table in the file's pos_embed, to this tolerance.
SINCOS_ATOL = 1e-4


class ConversionError(ValueError):
    """A checkpoint does not fit the configured model. `problems` lists every mismatch."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:  # one line, so a command line can print it as its error
            super().__init__(f"{what}: {self.problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s)\n{lines}")


# ---------------------------------------------------------------------------------------------
# The key table.
# (JAX path, timm key, transform); `{i}` stands for a block index. Rows are in timm's
# state-dict order, so exports list keys exactly as MeFEm's files do.
#   identity: same array.  conv: HWIO <-> OIHW.  dense: Flax kernel (in, out) = torch weight.T.
# ---------------------------------------------------------------------------------------------
KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("cls_token", "cls_token", "identity"),
    ("pos_embed", "pos_embed", "identity"),
    ("patch_embed/proj/kernel", "patch_embed.proj.weight", "conv"),
    ("patch_embed/proj/bias", "patch_embed.proj.bias", "identity"),
    ("blocks_{i}/norm1/scale", "blocks.{i}.norm1.weight", "identity"),
    ("blocks_{i}/norm1/bias", "blocks.{i}.norm1.bias", "identity"),
    ("blocks_{i}/attn/qkv/kernel", "blocks.{i}.attn.qkv.weight", "dense"),
    ("blocks_{i}/attn/qkv/bias", "blocks.{i}.attn.qkv.bias", "identity"),
    ("blocks_{i}/attn/proj/kernel", "blocks.{i}.attn.proj.weight", "dense"),
    ("blocks_{i}/attn/proj/bias", "blocks.{i}.attn.proj.bias", "identity"),
    ("blocks_{i}/norm2/scale", "blocks.{i}.norm2.weight", "identity"),
    ("blocks_{i}/norm2/bias", "blocks.{i}.norm2.bias", "identity"),
    ("blocks_{i}/mlp/fc1/kernel", "blocks.{i}.mlp.fc1.weight", "dense"),
    ("blocks_{i}/mlp/fc1/bias", "blocks.{i}.mlp.fc1.bias", "identity"),
    ("blocks_{i}/mlp/fc2/kernel", "blocks.{i}.mlp.fc2.weight", "dense"),
    ("blocks_{i}/mlp/fc2/bias", "blocks.{i}.mlp.fc2.bias", "identity"),
    ("norm/scale", "norm.weight", "identity"),
    ("norm/bias", "norm.bias", "identity"),
)

# kind -> (JAX array -> timm array, timm array -> JAX array)
_TRANSFORMS = {
    "identity": (lambda a: a, lambda a: a),
    "conv": (lambda a: a.transpose(3, 2, 0, 1), lambda a: a.transpose(2, 3, 1, 0)),
    "dense": (lambda a: a.T, lambda a: a.T),
}


def _transformed_shape(shape: tuple[int, ...], kind: str, to_timm: bool) -> tuple[int, ...]:
    """The shape an array of `shape` takes through a transform (on a zero-stride view: no memory)."""
    return _TRANSFORMS[kind][0 if to_timm else 1](np.broadcast_to(np.float32(0), shape)).shape


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_ROWS = [(_template_regex(j), _template_regex(t), j, t, kind) for j, t, kind in KEY_TABLE]


def jax_to_timm_key(path: str) -> tuple[str, str] | None:
    """'blocks_3/attn/qkv/kernel' -> ('blocks.3.attn.qkv.weight', 'dense'); None if no row fits."""
    for jax_re, _, _, timm_t, kind in _ROWS:
        m = jax_re.match(path)
        if m:
            return timm_t.format(**m.groupdict()), kind
    return None


def timm_to_jax_key(key: str) -> tuple[str, str] | None:
    """'blocks.3.attn.qkv.weight' -> ('blocks_3/attn/qkv/kernel', 'dense'); None if no row fits."""
    for _, timm_re, jax_t, _, kind in _ROWS:
        m = timm_re.match(key)
        if m:
            return jax_t.format(**m.groupdict()), kind
    return None


# ---------------------------------------------------------------------------------------------
# The layout of one configured model.
# ---------------------------------------------------------------------------------------------
def encoder_param_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """JAX parameter path -> shape for the configured encoder (abstract init, no FLOPs)."""
    # The unrolled layout (blocks_{i}) whatever model.scan_layers says: the table names one block each.
    model = encoder_from_config(model_cfg).clone(scan=False)
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def timm_layout(model_cfg) -> dict[str, tuple[tuple[int, ...], str | None, str]]:
    """timm key -> (shape, JAX path, transform) for the configured encoder, in timm's order.

    A sin-cos model has no `pos_embed` parameter; its row has JAX path None and kind "sincos":
    the timm file carries the fixed table.
    """
    jax_shapes = encoder_param_shapes(model_cfg)
    width, depth, _ = encoder_dims(model_cfg)
    # timm's order: everything before the blocks, then block 0's keys, block 1's, ..., then the rest.
    block_rows = [row for row in KEY_TABLE if "{i}" in row[0]]
    ordered = []
    for row in KEY_TABLE:
        if "{i}" not in row[0]:
            ordered.append((row, None))
        elif row is block_rows[0]:
            ordered += [(block_row, i) for i in range(depth) for block_row in block_rows]
    layout = {}
    for (jax_t, timm_t, kind), i in ordered:
        path, key = jax_t.format(i=i), timm_t.format(i=i)
        if path in jax_shapes:
            layout[key] = (_transformed_shape(jax_shapes[path], kind, to_timm=True), path, kind)
        elif key == "pos_embed":
            n = (model_cfg.image_size // model_cfg.patch_size) ** 2
            layout[key] = ((1, 1 + n, width), None, "sincos")
    uncovered = set(jax_shapes) - {path for _, path, _ in layout.values()}
    if uncovered:  # a parameter was added to ViT without a row in KEY_TABLE
        raise ConversionError("KEY_TABLE is incomplete", [f"no timm key for {p}" for p in sorted(uncovered)])
    return layout


def _sincos_table(model_cfg) -> np.ndarray:
    width, _, _ = encoder_dims(model_cfg)
    side = model_cfg.image_size // model_cfg.patch_size
    return sincos_pos_embed(width, side, side)


def _to_numpy(value: Any) -> np.ndarray:
    """numpy / jax / torch array -> float32 numpy, without importing torch."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu().float().numpy()  # .float(): numpy has no bfloat16
    return np.asarray(value, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# In-memory conversion, both directions.
# ---------------------------------------------------------------------------------------------
def params_to_timm(params: Mapping, model_cfg) -> dict[str, np.ndarray]:
    """Encoder params -> flat float32 timm state dict (MeFEm's layout, timm's key order).

    The arrays are copied to the host, so on several hosts pass fully replicated (gathered)
    params.
    """
    if set(params) == {"params"}:  # accept the whole variables dict too
        params = params["params"]
    flat = traverse_util.flatten_dict(unstack_blocks(params), sep="/")  # scanned or not
    layout = timm_layout(model_cfg)
    paths = [path for _, path, _ in layout.values() if path is not None]

    problems = [f"unexpected parameter {p}" + ("" if jax_to_timm_key(p) else " (no row in KEY_TABLE)")
                for p in flat if p not in paths]
    problems += [f"missing parameter {p}" for p in paths if p not in flat]
    out = {}
    for key, (shape, path, kind) in layout.items():
        if kind == "sincos":
            out[key] = _sincos_table(model_cfg)
        elif path in flat:
            value = _to_numpy(flat[path])
            expected = _transformed_shape(shape, kind, to_timm=False)
            if value.shape != expected:
                problems.append(f"{path}: shape {value.shape}, the model has {expected}")
            else:
                out[key] = np.ascontiguousarray(_TRANSFORMS[kind][0](value))
    if problems:
        raise ConversionError("cannot export these parameters", problems)
    return out


def timm_to_params(state_dict: Mapping[str, Any], model_cfg) -> dict:
    """Flat timm state dict -> encoder params (nested dict of float32 numpy arrays)."""
    layout = timm_layout(model_cfg)
    arrays = {k: _to_numpy(v) for k, v in state_dict.items()}

    problems = []
    for key in arrays:
        if key not in layout:
            if key.startswith(("head.", "fc_norm.")):
                hint = " (a classifier head: export the backbone with num_classes=0)"
            elif timm_to_jax_key(key) is None:
                hint = " (not a timm ViT encoder key)"
            else:
                hint = f" (the configured encoder has no {timm_to_jax_key(key)[0]})"
            problems.append(f"unexpected key {key}{hint}")
    problems += [f"missing key {k}" for k in layout if k not in arrays]

    flat = {}
    for key, (shape, path, kind) in layout.items():
        if key not in arrays:
            continue
        array = arrays[key]
        if array.shape != shape:
            problems.append(f"{key}: shape {array.shape} in the checkpoint, {shape} in the model")
        elif kind == "sincos":
            err = float(np.abs(array - _sincos_table(model_cfg)).max())
            if err > SINCOS_ATOL:
                problems.append(
                    f"pos_embed differs from the fixed sin-cos table (max |diff| {err:.3g}); the "
                    f"checkpoint learned its position embedding: set model.posemb=learn to import it")
        else:
            flat[path] = np.ascontiguousarray(_TRANSFORMS[kind][1](array))
    if problems:
        raise ConversionError("checkpoint does not match the configured encoder", problems)
    params = traverse_util.unflatten_dict(flat, sep="/")
    return stack_blocks(params) if model_cfg.get("scan_layers", False) else params


# ---------------------------------------------------------------------------------------------
# Reading checkpoints.
# ---------------------------------------------------------------------------------------------
def load_pth(path: str | Path) -> Any:
    """torch.load on CPU with weights_only (no code execution from the file)."""
    import torch
    return torch.load(str(path), map_location="cpu", weights_only=True)


def save_pth(state_dict: Mapping[str, np.ndarray], path: str | Path) -> None:
    """torch.save a flat dict of arrays as torch tensors (MeFEm's `.pth.tar` format)."""
    import torch
    torch.save({k: torch.tensor(np.asarray(v)) for k, v in state_dict.items()}, str(path))  # copies


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Drop a DistributedDataParallel prefix when every key carries it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _adapt_ijepa(state_dict: dict[str, Any], seed: int) -> tuple[dict[str, Any], list[str]]:
    """Give an I-JEPA encoder the CLS token it never had.

    I-JEPA's ViT has no CLS token and its (fixed sin-cos) pos_embed covers patches only. Add a
    zero CLS row to pos_embed (our table is zero at CLS) and a freshly initialised cls_token.
    """
    notes = []
    state_dict = {k: _to_numpy(v) for k, v in state_dict.items()}
    if "cls_token" not in state_dict and "pos_embed" in state_dict:
        pos = state_dict["pos_embed"]
        width = pos.shape[-1]
        n = pos.shape[1]
        if int(round(np.sqrt(n))) ** 2 == n:  # patches only: prepend the CLS row
            state_dict["pos_embed"] = np.concatenate([np.zeros((1, 1, width), np.float32), pos], 1)
            notes.append("pos_embed had no CLS row; added a zero row")
        cls = trunc_normal()(jax.random.key(seed), (1, 1, width), jnp.float32)
        state_dict["cls_token"] = np.asarray(cls)
        notes.append(f"checkpoint has no cls_token; initialised a fresh one (trunc-normal 0.02, "
                     f"seed {seed}): CLS features are untrained until fine-tuned")
    return state_dict, notes


def _first_line(err: Exception) -> str:
    """'Type: first sentence' of a library's error, which can run to paragraphs."""
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text.split('. ')[0]}"


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """load_file, with a damaged or foreign file named in one line instead of a bare SafetensorError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ConversionError(f"cannot read {path}", [
            f"not a valid safetensors file (truncated, damaged or another format): {_first_line(err)}"]) from None


def _load_torch_file(path: Path) -> Any:
    """load_pth, with a damaged or foreign file named in one line (torch's own errors name no file)."""
    import pickle
    try:
        return load_pth(path)
    except pickle.UnpicklingError:
        # torch's message here advises weights_only=False, i.e. running code from the file: not repeated.
        raise ConversionError(f"cannot read {path}", [
            "torch.load(weights_only=True) refused it: not a torch checkpoint, damaged, or it holds "
            "objects other than tensors"]) from None
    except (EOFError, RuntimeError) as err:  # empty file, broken zip archive
        raise ConversionError(f"cannot read {path}", [
            f"not a readable torch checkpoint (truncated, damaged or another format): {_first_line(err)}"]) from None


def read_state_dict(path: str | Path, which: str = "target_encoder",
                    seed: int = 0) -> tuple[dict[str, Any], list[str]]:
    """Read a checkpoint into a flat timm-layout state dict; also return notes on what was adapted.

    Accepts: a folder holding `model.safetensors` (or `model.pth.tar`); a `.safetensors` file; a
    torch file holding a flat state dict (MeFEm `.pth.tar`), one wrapped under `state_dict` or
    `model`, or an official I-JEPA checkpoint (`encoder` / `target_encoder` / `predictor`
    dicts, `module.` prefix), of which `which` is read.
    """
    path = Path(path)
    notes: list[str] = []
    if path.is_dir():
        for name in ("model.safetensors", "model.pth.tar"):
            if (path / name).is_file():
                return read_state_dict(path / name, which, seed)
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.pth.tar")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path), notes

    obj = _load_torch_file(path)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"cannot read {path}", [f"expected a dict, found {type(obj).__name__}"])
    if "encoder" in obj or "target_encoder" in obj:
        if which not in obj:
            raise ConversionError(f"cannot read {path}", [
                f"I-JEPA checkpoint has no {which!r}; it holds {sorted(k for k in obj)}"])
        notes.append(f"I-JEPA checkpoint: read {which!r}")
        state_dict, adapted = _adapt_ijepa(_strip_prefix(obj[which]), seed)
        return state_dict, notes + adapted
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            notes.append(f"read the state dict under {wrapper!r}")
            obj = obj[wrapper]
            break
    return _strip_prefix(obj), notes


def load_encoder_params(path: str | Path, model_cfg, which: str = "target_encoder",
                        seed: int = 0) -> dict:
    """Read any supported checkpoint (see `read_state_dict`) into encoder params for `model_cfg`.

    Adaptations (e.g. a fresh CLS token for I-JEPA weights) are logged as warnings.
    """
    state_dict, notes = read_state_dict(path, which, seed)
    for note in notes:
        logger.warning("%s: %s", path, note)
    return timm_to_params(state_dict, model_cfg)


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

    from safetensors.numpy import save
    # timm reads safetensors regardless of the format tag; "pt" is what HF tooling expects.
    # Bytes written through Python, not safetensors' save_file: that creates the file 0600, unlike
    # the other files here (0644 under the usual umask), and a shared release folder must be readable.
    (out_dir / "model.safetensors").write_bytes(save(state_dict, metadata={"format": "pt"}))
    if "pth" in formats:
        save_pth(state_dict, out_dir / "model.pth.tar")
    (out_dir / "config.json").write_text(json.dumps(timm_config(model_cfg), indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(model_cfg, card) + CARD_MARK + "\n")
    return out_dir


# ---------------------------------------------------------------------------------------------
# timm on CPU machines.
# ---------------------------------------------------------------------------------------------
_TORCHVISION_SCHEMAS = None  # the torch.library.Library must stay alive to keep its schemas


def _torchvision_ops_missing() -> bool:
    """True when torchvision is installed but its C++ ops library does not load into this torch.

    Probes the library the way torchvision's own import does (`torch.ops.load_library`); when it
    loads, torchvision would load it anyway (dlopen is idempotent), so the probe changes nothing.
    """
    import importlib.machinery
    import importlib.util

    import torch
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    finder = importlib.machinery.FileFinder(
        str(Path(spec.origin).parent),
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
    ext = finder.find_spec("_C")
    if ext is None:
        return True
    try:
        torch.ops.load_library(ext.origin)
    except OSError:
        return True
    return False


def declare_torchvision_ops() -> bool:
    """Let a CUDA torchvision import under a CPU torch (DESIGN.md 8); True if it had to act.

    In that pairing torchvision's C++ ops do not load and its import fails with "operator
    torchvision::nms does not exist" (its Python side registers fake kernels for those ops).
    Declaring the two op schemas first lets the import through; only torchvision's detection
    ops, which nothing here uses, stay unavailable. With a matching torchvision nothing is done.
    Call it before the first `import timm` / `import torchvision`.
    """
    global _TORCHVISION_SCHEMAS
    import sys

    import torch
    if (torch.version.cuda is not None or _TORCHVISION_SCHEMAS is not None
            or "torchvision" in sys.modules or not _torchvision_ops_missing()):
        return False
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SCHEMAS = lib
    return True


def import_timm():
    """`import timm`, working on CPU-torch machines too (see `declare_torchvision_ops`)."""
    declare_torchvision_ops()
    import timm
    return timm


# ---------------------------------------------------------------------------------------------
# Command line: a training run (or any checkpoint the importer reads) -> a timm folder.
#
#   python -m mefem_jax.export --workdir=WORKDIR --out=FOLDER [--which=target|context] [--step=N]
#                              [--format=safetensors,pth] [--overwrite]
#   python -m mefem_jax.export --checkpoint=WORKDIR/checkpoints/N --out=FOLDER
#   python -m mefem_jax.export --checkpoint=MeFEm-S.pth.tar|model.safetensors|FOLDER[:heads=H] --out=FOLDER
#
# The library above imports models only; the CLI is an entry point and reads training runs through
# mefem_jax.checkpoint and foreign files through mefem_jax.evaluation.model_spec, imported when used.
# ---------------------------------------------------------------------------------------------
def _define_flags() -> None:
    # Defined only when this file runs as a program: train.py imports this module after its own
    # flags (it also has --workdir) are parsed, and absl refuses a flag defined twice.
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


def _from_workdir(workdir: str, which: str, step: int | None, source: str):
    import ml_collections

    from mefem_jax.checkpoint import load_params_for_eval

    params, config, step = load_params_for_eval(workdir, which, step)
    model_cfg = ml_collections.ConfigDict(config["model"])
    return params, model_cfg, training_card(config, step, which, source)


def _is_orbax_step(path: Path) -> bool:
    return path.is_dir() and (path / "_CHECKPOINT_METADATA").is_file()


def _from_checkpoint(spec: str, which: str):
    path = Path(spec)
    if (path / "checkpoints").is_dir():  # a training workdir after all
        return _from_workdir(spec, which, None, source=spec)
    if _is_orbax_step(path):
        if not path.name.isdigit() or path.parent.name != "checkpoints":
            raise FileNotFoundError(f"{path} is an Orbax checkpoint but not WORKDIR/checkpoints/<step>; "
                                    "pass the training workdir with --workdir (and --step)")
        return _from_workdir(str(path.parent.parent), which, int(path.name), source=str(path.parent.parent))
    if spec.startswith("random:"):
        raise ValueError(f"--checkpoint={spec}: a random model has nothing to export")
    from mefem_jax.evaluation.model_spec import load_model

    loaded = load_model(spec, which=which)
    card = {"source": spec}
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
        if FLAGS.workdir is not None:
            if not Path(FLAGS.workdir).is_dir() and "://" not in FLAGS.workdir:
                raise FileNotFoundError(f"--workdir {FLAGS.workdir} does not exist")
            params, model_cfg, card = _from_workdir(FLAGS.workdir, FLAGS.which, FLAGS.step, FLAGS.workdir)
        else:
            params, model_cfg, card = _from_checkpoint(FLAGS.checkpoint, FLAGS.which)
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
