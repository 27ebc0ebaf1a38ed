"""Face data: ArrayRecord shards, Grain pipelines, TFDS and synthetic sources.

Read in this order:
  records.py       one face record as bytes (image + id + labels)
  manifest.py      the manifest.json that makes a shard folder a dataset
  csv_text.py      the labels CSV and its row-filter grammar (shared with evaluation)
  build_shards.py  CLI: image folder + labels CSV → shards + manifest, built from
    shard_plan.py    options, the file listing and the CSV plan
    shard_image.py   one image → one record (or a skip reason)
    shard_writer.py  one shard file, and the out-folder safety checks
    shard_faces.py   the optional face step: face_landmarks.py (dlib detector, 68 points),
                     face_align.py (eyes level, the UTKFace framing), face_proportions.py (labels)
  synthetic.py     procedurally drawn faces with known attributes (the default dataset)
  sources.py       "synthetic" | shard folder | *.array_record glob | tfds:NAME → Grain source
  decode.py        bytes → RGB, with JPEG draft decoding (simplejpeg when installed, else PIL)
  normalization.py the ImageNet mean and std every encoder here expects
  augment.py       host side: random-resized crop, flip, centre square (eval: + normalisation)
  device_augment.py  in the train step: crop, flip, normalisation of the uint8 batch
  pipeline.py      the training and evaluation iterators (the API train.py uses)

Nothing is imported here: `build_shards` and its worker processes need only PIL and the record
format, not Grain (whose import pulls in JAX and costs seconds per process). Import what you
use, e.g. `from mefem_jax.data.pipeline import make_train_iterator`.
"""
