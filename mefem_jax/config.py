"""The MeFEm recipe: one ConfigDict with a section per module, each section's defaults beside its code.

A recipe reads top to bottom in `base_config` below; each section's keys are documented where they live:

    model      models/vit.py           default_model_config
    predictor  models/predictor.py     default_predictor_config
    mask       masking/config.py       default_mask_config, MASK_RULES
    loss       objective/losses.py     default_loss_config, LOSS_RULES
    optim      training/optim.py       default_optim_config, OPTIM_RULES
    data       data/config.py          default_data_config, DATA_RULES
    eval       evaluation/config.py    default_eval_config, EVAL_RULES
    mesh, checkpoint, seed, total_steps, log_every, init_from: here (RUN_RULES)

The section modules hold data, not pipelines: loading a config imports no Grain, probe or TPU code.
The files in `configs/` pick a model size and a recipe and call `base_config`; `--config.a.b=value` on
the command line overrides anything. `validate_config` applies every section's rules at start-up.
"""
from __future__ import annotations

import ml_collections

from mefem_jax import config_checks as checks
from mefem_jax import masking
from mefem_jax.data.config import DATA_RULES, default_data_config
from mefem_jax.evaluation.config import EVAL_RULES, default_eval_config
from mefem_jax.models import attention_impl
from mefem_jax.models.predictor import default_predictor_config
from mefem_jax.models.vit import compute_dtype, default_model_config, encoder_dims, patch_grid
from mefem_jax.objective import losses
from mefem_jax.training import optim


def base_config(variant: str = "B", *, remat: bool = False, predictor_depth: int = 6) -> ml_collections.ConfigDict:
    """The MeFEm recipe at one encoder size (docs/METHOD.md 6): I-JEPA's optimisation at global batch
    2048 for 150k steps (~300 epochs of a 1M-face corpus) with 20k warm-up steps, MeFEm's stripes,
    circular weighting and CLS reassignment on. `configs/vit{s,b,l}.py` differ only in the arguments.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 150_000
    c.log_every = 50

    c.model = default_model_config()  # models/vit.py documents each key
    c.model.update(variant=variant, remat=remat)
    c.predictor = default_predictor_config()
    c.predictor.depth = predictor_depth
    c.mask = masking.default_mask_config()
    c.loss = losses.default_loss_config()
    c.optim = optim.default_optim_config()
    c.data = default_data_config()
    c.data.batch_size = 2048
    c.optim.warmup_steps = 20_000

    # Device mesh (sharding.py): sizes of the `data` and `fsdp` axes; -1 takes the remaining devices.
    # Leaves smaller than min_fsdp_size elements stay replicated on the fsdp axis.
    c.mesh = dict(data=-1, fsdp=1, min_fsdp_size=2 ** 14)
    c.checkpoint = dict(every_steps=2000, max_to_keep=3)
    # Linear probes on a labelled set every `eval.every_steps` (0 = off), logged with the metrics.
    c.eval = default_eval_config()
    # Continue pretraining from any weights encoders.load_encoder_params reads (a release, an export, another
    # run or one of its steps): the encoder only; the predictor starts fresh.
    c.init_from = ""
    return c


# Start-up checks of the keys this file owns (config_checks.check_section).
RUN_RULES = (
    checks.Rule(("total_steps",), lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                "an integer >= 1"),
    checks.positive("log_every", "model.patch_size", "model.image_size",
                    "checkpoint.every_steps", "checkpoint.max_to_keep"),
    checks.Rule(("mesh.data", "mesh.fsdp"), lambda v: isinstance(v, int) and (v == -1 or v >= 1), "-1 or >= 1"),
    checks.one_of("model.attention", attention_impl.CHOICES),
)
SECTION_RULES = {"": RUN_RULES, "mask": masking.MASK_RULES, "loss": losses.LOSS_RULES,
                 "optim": optim.OPTIM_RULES, "data": DATA_RULES, "eval": EVAL_RULES}


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Start-up checks of a whole config: every section's rules, then what relates two keys.

    Raises ConfigError (one line: key, value, allowed range) on the first bad value.
    """
    for section, rules in SECTION_RULES.items():
        checks.check_section(c[section] if section else c, section, rules)
    checks.require("model.image_size", c.model.image_size, c.model.image_size % c.model.patch_size == 0,
                   f"a multiple of model.patch_size={c.model.patch_size}")
    if c.eval.get("select"):
        checks.require("eval.every_steps", c.eval.every_steps, c.eval.every_steps > 0,
                       f"> 0 with eval.select={c.eval.select!r}: the kept step is chosen among the probed ones")
    side = min(patch_grid(c.model))
    if "grid" in str(c.eval.features).split(","):  # a grid finer than the patches only repeats them
        checks.require("eval.grid_size", c.eval.grid_size, c.eval.grid_size <= side,
                       f"at most the model's patch grid side, {side}")
    if c.model.attention == "cudnn":  # refused here, on this process's backend, rather than in the first trace
        width, _, heads = encoder_dims(c.model)
        predictor_heads = c.predictor.heads or heads
        attention_impl.check_attention("cudnn", compute_dtype(c.model.dtype),
                                       (width // heads, c.predictor.width // predictor_heads))


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any config so the full entry point runs on a 2-core CPU in a few minutes.

    112 px gives a 7x7 patch grid; the width-128, depth-4 encoder and a 2-block predictor keep a step at
    a fraction of a second. Learning rates are quoted at the smoke batch (no linear rescaling), and a
    higher peak than the recipe's lets the loss move visibly within a couple of hundred steps.
    """
    c.total_steps = 200
    c.log_every = 10
    c.model.update(image_size=112, width=128, depth=4, heads=4, dtype="float32", remat=False)
    c.predictor.update(width=64, depth=2, heads=4)
    c.data.batch_size = 32
    c.optim.update(ref_batch=32, lr=1.5e-3, start_lr=2e-4, final_lr=1e-5, warmup_steps=20)
    c.checkpoint.every_steps = 100
    return c


def apply_cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The small-scale pretraining recipe: a run of ~20 minutes on a 2-core CPU.

    Unlike `smoke` (which only proves the entry point runs), this variant keeps what makes the
    full-size recipe mean what it means, and shortens only what must be short:

    * **Mask geometry.** 112 px with patch 8 is a 14x14 patch grid, the grid of 224 px / patch 16.
      Stripes, multiblock and quadrant therefore draw exactly the layouts they draw for ViT-S/B at
      224 (on the 7x7 grid of patch 16 the stripe ratio window admits a single layout and multiblock
      targets shrink to a few cells).
    * **Learning rate.** The recipe's own, 1e-3 at the reference batch 2048, scaled linearly to the
      run's batch like every other config: 3.1e-5 at batch 64. (`:smoke` quotes 1.5e-3 at its own
      batch, 48x this.) A 4x higher rate and the optional SIGReg term were tried and judged on the
      validation split: docs/RESULTS.md.
    * **Schedules for a 600-step run** (~2 epochs of UTKFace's train split at batch 64). Warm-up 10 % of
      the run. The EMA momentum runs 0.99 -> 0.999, so the target averages the last ~100 -> ~1000
      steps; I-JEPA's 0.996 -> 1.0 would leave the target (what is probed) mostly the random init.
    * **Probes.** Every 100 steps (the learning-curve script uses 200) on `eval.*`, which should name
      a validation split (see scripts/learning_curves.sh); CLS, mean-pooled and 2x2-grid readouts,
      with the representation's effective rank (RankMe) beside them.

        python -m mefem_jax.train --config=configs/vits.py:cpu --workdir=runs/cpu \
            --config.data.train=SHARDS --config.eval.train=... --config.eval.test=...
    """
    c.total_steps = 600
    c.log_every = 25
    c.model.update(image_size=112, patch_size=8, width=128, depth=4, heads=4, dtype="float32", remat=False)
    c.predictor.update(width=64, depth=2, heads=4)
    c.data.batch_size = 64
    c.optim.update(ref_batch=2048, lr=1e-3, start_lr=0.0, final_lr=1e-6, warmup_steps=60, ema=(0.99, 0.999))
    c.checkpoint.update(every_steps=200, max_to_keep=5)
    c.eval.update(every_steps=100, features="cls,mean,grid")
    return c


VARIANTS = {"smoke": apply_smoke, "cpu": apply_cpu}


def finish(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies the `:arg` suffix of `--config=configs/x.py:arg` (one of VARIANTS)."""
    if arg in (None, ""):
        return c
    if arg in VARIANTS:
        return VARIANTS[arg](c)
    raise ValueError(f"unknown config argument {arg!r}; the variants are {sorted(VARIANTS)}")
