"""Pictures of the method: masks drawn over real faces (MeFEm's masking figure) and the loss-weight matrix.

    python -m mefem_jax.viz --config=configs/vitb.py --out=plots/ [--faces=../shared/data/utkface]

Writes `masks.png` (one row per strategy: multiblock, quadrant, axial stripes; context in blue, target in
orange, cells that are neither left dim) and `loss_weights.png` (the circular weight matrix with values).
The masks come from the same jitted samplers the train step uses, so the figure shows what trains.
"""
from __future__ import annotations

import copy
from pathlib import Path

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags
from PIL import Image

from mefem_jax import cli
from mefem_jax.masking import make_masker
from mefem_jax.models.vit import patch_grid
from mefem_jax.objective import losses

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vitb.py.")
_OUT = flags.DEFINE_string("out", "plots", "Output folder for the PNGs.")
_FACES = flags.DEFINE_string("faces", "../shared/data/utkface", "Folder with images/ (and labels.csv) to draw on.")
_N = flags.DEFINE_integer("num_faces", 4, "Faces per strategy.")

STRATEGIES = ("multiblock", "quadrant", "stripes")
CONTEXT_RGB = np.array([40, 110, 255], np.float32)
TARGET_RGB = np.array([255, 140, 0], np.float32)


def load_faces(folder: str | Path, n: int, size: int) -> list[np.ndarray]:
    """The first `n` images (sorted names, so the figure is reproducible), resized to `size` px."""
    folder = Path(folder)
    files = sorted((folder / "images").glob("*.jpg")) if (folder / "images").is_dir() else sorted(folder.glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no .jpg faces under {folder} (expected {folder}/images/*.jpg)")
    step = max(len(files) // n, 1)  # spread over the sorted list: varied ages rather than n centenarians
    picked = files[::step][:n]
    return [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f in picked]


def overlay(face: np.ndarray, grid: tuple[int, int], ctx: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """Tints each patch: context blue, target orange, neither darkened; thin grid lines between patches."""
    gh, gw = grid
    ph, pw = face.shape[0] // gh, face.shape[1] // gw
    role = np.zeros(gh * gw, np.int8)
    role[tgt] = 2
    role[ctx] = 1
    role = np.kron(role.reshape(gh, gw), np.ones((ph, pw), np.int8))
    out = face.astype(np.float32)
    out[role == 1] = 0.45 * out[role == 1] + 0.55 * CONTEXT_RGB
    out[role == 2] = 0.45 * out[role == 2] + 0.55 * TARGET_RGB
    out[role == 0] *= 0.35
    out[::ph, :] = out[:, ::pw] = 255
    return out.clip(0, 255).astype(np.uint8)


def mask_figure(config, faces: list[np.ndarray], out_png: Path, seed: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = patch_grid(config.model)
    fig, axes = plt.subplots(len(STRATEGIES), len(faces), figsize=(2.4 * len(faces), 2.6 * len(STRATEGIES)),
                             squeeze=False)
    for row, strategy in enumerate(STRATEGIES):
        mask_cfg = copy.deepcopy(config.mask).unlock()
        mask_cfg.strategy = strategy
        masker = make_masker(mask_cfg, grid)
        masks = jax.device_get(jax.jit(masker, static_argnums=1)(jax.random.PRNGKey(seed + row), len(faces)))
        for col, face in enumerate(faces):
            ctx = masks.ctx_idx[col][masks.ctx_valid[col]]
            tgt = masks.tgt_idx[col][masks.tgt_valid[col]]
            ax = axes[row, col]
            ax.imshow(overlay(face, grid, ctx, tgt))
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(strategy, fontsize=12)
            ax.set_title(f"ctx {ctx.size}  tgt {tgt.size}", fontsize=8)
    fig.suptitle("Masking strategies (blue: context, orange: target, dark: unused)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def weights_figure(config, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = patch_grid(config.model)
    w = losses.loss_weight_grid(config.loss, grid)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(w, cmap="viridis")
    for (i, j), v in np.ndenumerate(w):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6 if grid[0] > 8 else 8,
                color="white" if v < w.mean() else "black")
    c = config.loss.circular
    ax.set_title(f"Loss weights ({c.profile}, r0={c.r0}, r1={c.r1}, w_min={c.w_min}; mean 1)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    config = _CONFIG.value
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    faces = load_faces(_FACES.value, _N.value, config.model.image_size)
    mask_figure(config, faces, out / "masks.png")
    weights_figure(config, out / "loss_weights.png")
    print(f"wrote {out / 'masks.png'} and {out / 'loss_weights.png'}")


if __name__ == "__main__":
    cli.run("viz", main, _CONFIG)
