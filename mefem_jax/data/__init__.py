"""Face data for training: records, manifests, sources and the Grain input pipeline.

Read in this order:
  records.py        one face record as bytes (image + id + labels)
  manifest.py       the manifest.json that makes a shard folder a dataset
  csv_text.py       the labels CSV and its row-filter grammar (shared with evaluation and the builder)
  synthetic.py      procedurally drawn faces with known attributes (the default dataset)
  gcs.py            gs://BUCKET/PATH is read where the launcher mounts it: /mnt/gcs/BUCKET/PATH
  sources.py        "synthetic" | shard folder | *.array_record glob | tfds:NAME -> Grain source
  mixture.py        several sources by weight: `A:0.7;B:0.3` -> one shuffled, interleaved stream
  face_hash.py      exact (pixel SHA-256) and near (registered DCT) hashes of a face; duplicate matching
  leakage.py        command: evaluation faces with a near-duplicate in the pretraining data
  decode.py         bytes -> RGB, with JPEG draft decoding (simplejpeg when installed, else PIL)
  normalization.py  the ImageNet mean and std every encoder here expects
  augment.py        host side: random-resized crop, flip, centre square (eval: + normalisation)
  device_augment.py in the train step: crop, flip, normalisation of the uint8 batch
  config.py         the `data` section of a training config: defaults and start-up rules
  pipeline.py       the training and evaluation iterators (the API train.py uses)

The offline builder that makes shard folders from image folders is the subpackage `shards/` (its
command: `python -m mefem_jax.data.build_shards`, a two-line module here).

Nothing is imported here: the builder and its worker processes need only PIL and the record format,
not Grain (whose import pulls in JAX and costs seconds per process). Import what you use, e.g.
`from mefem_jax.data.pipeline import make_train_iterator`.
"""
