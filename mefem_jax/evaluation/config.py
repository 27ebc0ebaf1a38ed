"""The `eval` section of a training config (the probes the train loop runs): defaults and start-up rules.

Beside the evaluation code, and importing none of it, so loading a config reads no probe or pipeline.
`online_probe.probe_during_training` reads these keys.
"""
from __future__ import annotations

import ml_collections

from mefem_jax import config_checks as checks


def default_eval_config() -> ml_collections.ConfigDict:
    """The `eval` block of a training config; every field can be set as --config.eval.NAME."""
    c = ml_collections.ConfigDict()
    c.every_steps = 0                       # probe every this many steps; 0 = never
    c.train = "synthetic:split=train"       # data spec the probes are fitted on (evaluation/data.py)
    c.test = "synthetic:split=test"         # data spec they are scored on
    c.targets = "face_width:regression,skin_tone:regression"  # see targets.py
    c.max_images = 512                      # per split; read once, kept in host memory as uint8
    c.batch_size = 64                       # images per forward pass
    c.features = "cls"                      # comma list of cls, mean, grid, pixels
    c.grid_size = 2                         # the grid readout pools patch tokens to grid_size^2 cells
    c.probe_threads = 1                     # BLAS threads for the fits (probes.blas_threads)
    # A probe metric (probe_age_mae, probe_gender_acc_grid, rankme_cls, ...): the target encoder of the step
    # where it is best is kept in WORKDIR/selected/ (training/kept_step.py); "" keeps none.
    c.select = ""
    return c


# Start-up checks of `eval` (config_checks.check_section).
EVAL_RULES = (
    checks.non_negative("every_steps"),
    checks.positive("max_images", "batch_size", "grid_size", "probe_threads"),
    checks.Rule(("select",), lambda v: v == "" or str(v).startswith(("probe_", "rankme_")),
                "'' or a probe metric of metrics.jsonl: probe_<target>_<metric>[_<readout>] or rankme_<readout>"),
)
