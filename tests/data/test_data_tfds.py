"""tfds:NAME[:SPLIT] on a TFDS ArrayRecord dataset written here, without TensorFlow."""
import os
import pickle
import sys

import numpy as np
import pytest

from helpers.faces import UTKFACE, utkface_rows
from mefem_jax.data import pipeline, sources
from mefem_jax.data.config import default_data_config

tfds = pytest.importorskip("tensorflow_datasets")


class UtkTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A few UTKFace faces as a TFDS dataset; written as ArrayRecord, which needs no TF."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, rows, **kwargs):
        self._rows = rows
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "id": tfds.features.Text(),
            "age": np.int32,
            "gender": tfds.features.ClassLabel(num_classes=2),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(self._rows[:24]),
                "test": self._generate_examples(self._rows[24:])}

    def _generate_examples(self, rows):
        for r in rows:
            yield r["file"], {"image": os.path.join(UTKFACE, "images", r["file"]),
                              "id": r["file"], "age": int(r["age"]), "gender": int(r["gender"])}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    rows = utkface_rows(36)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    UtkTiny(rows, data_dir=data_dir, file_format="array_record").download_and_prepare()
    return rows, data_dir


def _cfg(data_dir, **kw):
    cfg = default_data_config()
    cfg.tfds_data_dir, cfg.read_threads = data_dir, 2
    cfg.update(kw)
    return cfg


def test_tfds_split_reads_back_every_face_and_label(tfds_dir):
    rows, data_dir = tfds_dir
    it = pipeline.make_eval_iterator("tfds:utk_tiny:test", image_size=32, batch_size=8,
                                     data_cfg=_cfg(data_dir))
    assert it.label_schema == {"age": "int", "gender": "int"}
    got = {}
    for b in it:
        for k in np.flatnonzero(b["valid"]):
            got[b["id"][k]] = (int(b["age"][k]), int(b["gender"][k]))
            assert np.isfinite(b["image"][k]).all()
    assert got == {r["file"]: (int(r["age"]), int(r["gender"])) for r in rows[24:]}
    assert "tensorflow" not in sys.modules


def test_tfds_train_epoch_and_pickling_for_workers(tfds_dir):
    rows, data_dir = tfds_dir
    cfg = _cfg(data_dir, train="tfds:utk_tiny", return_ids=True)  # split defaults to train
    it = pipeline.make_train_iterator(cfg, image_size=32, global_batch_size=8, seed=0,
                                      process_index=0, process_count=1)
    ids = [i for _ in range(3) for i in next(it)["id"]]
    it.close()
    assert sorted(ids) == sorted(r["file"] for r in rows[:24])
    # Worker processes receive the source pickled.
    source = sources.open_source("tfds:utk_tiny:train", tfds_data_dir=data_dir)
    assert pickle.loads(pickle.dumps(source))[3]["image"] == source[3]["image"]


def test_tfds_errors_name_the_dataset_and_split(tfds_dir):
    _, data_dir = tfds_dir
    with pytest.raises(ValueError, match="has no split 'val'"):
        sources.open_source("tfds:utk_tiny:val", tfds_data_dir=data_dir)
    with pytest.raises(ValueError, match="'no_such_faces' not found"):
        sources.open_source("tfds:no_such_faces", tfds_data_dir=data_dir)


def test_tfds_spec_parsing():
    assert sources.parse_tfds_spec("tfds:faces", "train") == ("faces", "train")
    assert sources.parse_tfds_spec("tfds:faces:test", "train") == ("faces", "test")
    assert sources.parse_tfds_spec("tfds:faces/hq:1.2.0", "train") == ("faces/hq:1.2.0", "train")
    assert sources.parse_tfds_spec("tfds:faces:1.2.0:test", "x") == ("faces:1.2.0", "test")
