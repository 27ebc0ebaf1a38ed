"""The `data` section of a training config: its defaults and its start-up rules.

Beside the data code, and importing none of its pipeline (only the mixture grammar, plain Python), so loading
a config reads no Grain or JAX.
`pipeline.py` reads these keys; `device_augment.py` reads `augment_on`, `source_size` and the crop ranges.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from mefem_jax import config_checks as checks
from mefem_jax.data import mixture

AUGMENT_ON = ("device", "host")  # where crop and flip run: in the jitted step, or in the host pipeline


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` block of a training config; every field can be set as --config.data.NAME."""
    c = ml_collections.ConfigDict()
    c.train = "synthetic"                 # data spec (sources.py), or a mixture 'A:0.7;B:0.3' (mixture.py)
    c.batch_size = 128                    # global batch; train.py passes it on
    c.seed = 0                            # shuffle / augmentation seed train.py passes on
    c.workers = 0                         # Grain worker processes per host (0: in-process)
    c.prefetch = 2                        # finished batches queued per worker process
    c.read_threads = 4                    # decode threads inside each process
    c.read_buffer = 64                    # elements those threads may run ahead
    c.crop_scale = (0.3, 1.0)             # random-resized crop: fraction of the image area
    c.crop_ratio = (3 / 4, 4 / 3)         # … and aspect-ratio range
    c.flip = True                         # random horizontal flip
    c.augment_on = "device"               # where crop+flip run: "device" (in the step) or "host"
    c.source_size = 0                     # px of the uint8 images the device crops from; 0: image size
    c.synthetic_size = 16384              # images in synthetic:train
    c.synthetic_eval_size = 2048          # images per split when evaluating on synthetic
    c.synthetic_resolution = 0            # px the faces are drawn at; 0: the model's image size
    c.synthetic_seed = 0                  # which synthetic faces (fixed apart from the run seed)
    c.tfds_data_dir = config_dict.placeholder(str)  # for tfds: specs; None: TFDS's default
    c.max_consecutive_failures = 1000     # this many undecodable records in a row: stop, broken
    c.return_ids = False                  # add "id" to training batches
    return c


def _train_spec_ok(text) -> bool:
    """A mixture's weights are checked at start-up; the grammar's own message names the bad item, which
    says more than the generic 'allowed' line could."""
    try:
        mixture.parse(text)
    except mixture.MixtureError as err:
        raise checks.ConfigError(f"data.train: {err}; allowed: {mixture.GRAMMAR}") from None
    return isinstance(text, str) and bool(text.strip())


# Start-up checks of `data` (config_checks.check_section).
DATA_RULES = (
    checks.Rule(("train",), _train_spec_ok, mixture.GRAMMAR),
    checks.positive("batch_size", "read_threads", "read_buffer", "max_consecutive_failures"),
    checks.non_negative("workers", "prefetch"),
    checks.ordered_pair("crop_scale", 1e-6, 1),
    checks.ordered_pair("crop_ratio", 1e-6, float("inf")),
    checks.non_negative("source_size"),
    checks.one_of("augment_on", AUGMENT_ON),
)
