"""The fine-tuning recipe: MAE's and BEiT's, on the pretraining machinery's keys.

    python -m mefem_jax.finetune --config=configs/finetune.py --workdir=W --config.init=SPEC \
        --config.data.train=... --config.data.val=... --config.data.test=... --config.target=age:regression

Where the numbers come from:
* **Layer-wise lr decay 0.65, base lr 5e-4 per 256 images, AdamW (0.9, 0.999), weight decay 0.05, drop
  path 0.1, warm-up then cosine**: MAE's ViT-B fine-tuning (He et al. 2022, "Masked Autoencoders Are
  Scalable Vision Learners", Table 9), which took layer decay from BEiT (Bao et al. 2022).
  `optim.layer_decay` has `param_groups_lrd`'s semantics (finetuning/layer_decay.py).
* **No decay on biases, norms and tokens**: training/optim.py's mask, MAE's `no_weight_decay`.
* **The head on CLS** (`head.readout='mean'` for mean-pooled patches, MAE's global_pool), regression
  targets standardised (finetuning/outputs.py).
* **The head starts near zero** (`head.init='zero'`, MAE's std 2e-5): its gradients reach the encoder
  only as it grows. LP-FT (`head.init='probe'`: the head starts as a linear probe fitted on the frozen
  features of at most `head.probe_rows` faces, Kumar et al. 2022) is an option, not the default: with
  the small `:cpu` encoder its probe, fitted on standardised features, leans on directions whose spread
  over faces is tiny, and the first updates of the encoder moved them enough to blow the loss up
  (validation loss 1.39 at step 0, train loss 18.8 and gradient norm 16k at step 25; docs/RESULTS.md).
* **The head reads standardised features** (`head.standardize='batch'`, the default): BatchNorm without
  affine before the linear head, MAE's linear-probing head (Appendix A.2), kept through the fine-tune;
  its tracked mean and spread start from the frozen encoder's features of one augmented view of at most
  `head.probe_rows` train faces and are folded into `head.weight` / `head.bias` at export. 'fixed' keeps
  that start unchanged; 'none' is MAE's fine-tuning head. Why, from the small `:cpu` encoder: its
  features vary from face to face by a fraction of their size, so a near-zero head on raw features
  hardly grows in a short fine-tune, and with a fixed standardisation any encoder update moves every
  logit far (docs/RESULTS.md, "Fine-tuning"). `head.lr_scale` multiplies the head's learning rate
  (1: MAE's, the base rate the final norm also gets).
* **Crop and flip**: the pretraining pipeline's random-resized crop (0.3-1 of the face) and flip, in the
  step. MAE also uses RandAugment, mixup and cutmix, which are made for object classes, not faces.
* **Age-balanced sampling** (`data.balance='age:10'`): FAHR-FaceAge's inverse-frequency balancing.
* **The kept step**: the best on the validation split by `eval.select` (finetuning/scoring.py, training/kept_step.py).

`model` is not set here: it is the encoder's, read from `init` at start-up (weights/encoders.py).
"""
from __future__ import annotations

import ml_collections

from mefem_jax import config_checks as checks
from mefem_jax.data.config import DATA_RULES, default_data_config
from mefem_jax.finetuning.model import READOUTS, STANDARDIZE
from mefem_jax.models.vit import default_model_config
from mefem_jax.training import optim

HEAD_INITS = ("probe", "zero")


def default_finetune_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 5000
    c.log_every = 50
    c.init = ""                    # the encoder: anything encoders.load_encoder reads (run, step, export, .pth.tar)
    c.target = "age:regression"    # evaluate's --targets grammar; regression and classification
    c.drop_path = 0.1
    # standardize: batch | fixed | none (finetuning/model.py LinearHead); momentum: the tracked statistics'
    #   share kept per step ('batch'). lr_scale: the head's lr over the base rate.
    # probe_rows: the start's statistics and LP-FT's probe use at most this many train faces (0 = all)
    c.head = dict(readout="cls", init="zero", probe_rows=4096, standardize="batch", momentum=0.9, lr_scale=1.0)
    c.model = default_model_config()  # replaced by the encoder's at start-up
    c.model.scan_layers = False       # drop path and layer decay need the blocks unrolled
    c.optim = optim.default_optim_config()
    c.optim.update(lr=5e-4, start_lr=0.0, final_lr=1e-6, ref_batch=256, warmup_steps=500, wd=0.05,
                   final_wd=0.05, layer_decay=0.65)
    c.data = default_data_config()
    c.data.update(batch_size=256, train="", read_threads=4)
    c.data.val = ""                # labelled spec; the best step on it is kept (eval.select)
    c.data.test = ""               # labelled spec; scored once, with the kept step, at the end
    c.data.balance = ""            # 'COLUMN:BIN_WIDTH', e.g. 'age:10': every bin drawn equally often
    c.eval = dict(every_steps=250, select="loss", batch_size=256)
    c.checkpoint = dict(every_steps=500, max_to_keep=2)
    c.mesh = dict(data=-1, fsdp=1, min_fsdp_size=2 ** 14)
    return c


def apply_cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A fine-tune of the `configs/vits.py:cpu` encoder (4 blocks at 112 px) in minutes on a 2-core CPU:
    batch 64, 600 steps (2 epochs of 17k faces, 77 of 500), warm-up 10 %, validation every 100 steps.
    Layer decay 0.75: with 4 blocks, MAE's 0.65 would leave the embedding at 0.65^5 = 12 % of the head's
    rate; 0.75^5 = 24 % is closer to what 0.65 does over ViT-B's 12 blocks for the middle of the network.

    The rest was chosen on UTKFace's validation split with the 1,000-step encoder (docs/RESULTS.md,
    "Fine-tuning"), whose CLS features vary over faces by ~6 % of their size:
    * drop path 0: at 0.1 the features' spread under drop path was 4.1x their spread over faces;
    * crops of 0.8-1 of the face, not 0.3-1: a logistic probe on features of 0.3-1 crops ranked gender at
      cross-validated ROC-AUC 0.66, at 0.8-1 0.68 (whole faces 0.74; scripts/finetune_sensitivity.py);
    * lr 1e-4 per 256 images (2.5e-5 at batch 64) with the head at 400x (1e-2): of the 80-step pilots
      on the validation split, the only one whose validation loss fell steadily (docs/RESULTS.md)."""
    c.total_steps = 600
    c.log_every = 25
    c.drop_path = 0.0
    c.data.batch_size = 64
    c.data.crop_scale = (0.8, 1.0)
    c.optim.update(lr=1e-4, warmup_steps=60, layer_decay=0.75)
    c.head.lr_scale = 400.0
    c.eval.update(every_steps=100, batch_size=128)
    c.checkpoint.update(every_steps=100, max_to_keep=2)
    return c


def _spec_named(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


FINETUNE_RULES = (
    checks.Rule(("init",), _spec_named, "an encoder spec (a run, a step, an export, a .pth.tar, random:...)"),
    checks.Rule(("data.train", "data.val"), _spec_named, "a labelled data spec"),
    checks.Rule(("total_steps",), lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                "an integer >= 1"),
    checks.positive("log_every", "data.batch_size", "eval.every_steps", "eval.batch_size",
                    "checkpoint.every_steps", "checkpoint.max_to_keep"),
    checks.in_range("drop_path", lo=0, hi=1, closed_hi=False),
    checks.in_range("optim.layer_decay", lo=0, hi=1, closed_lo=False),
    checks.one_of("head.readout", READOUTS),
    checks.one_of("head.init", HEAD_INITS),
    checks.positive("head.lr_scale"),
    checks.one_of("head.standardize", STANDARDIZE),
    checks.in_range("head.momentum", lo=0, hi=1, closed_hi=False),
    checks.Rule(("head.probe_rows",), lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                "an integer >= 0 (0: every train face)"),
)


def validate(c: ml_collections.ConfigDict) -> None:
    """Start-up checks (one line each, ConfigError), before the workdir is touched."""
    checks.check_section(c, "", FINETUNE_RULES)
    checks.check_section(c.optim, "optim", optim.OPTIM_RULES)
    checks.check_section(c.data, "data", DATA_RULES)
