"""Fine-tuning a pretrained encoder with a linear head (`python -m mefem_jax.finetune`).

Read in this order:
  config.py         the recipe (MAE / BEiT fine-tuning, LP-FT, balanced sampling) and its start-up checks
  outputs.py        targets as the head's logit columns: label encoding, loss, decoding
  labelled_data.py  labelled splits decoded once into memory; the shuffled or balanced Grain stream
  model.py          the encoder + linear head on CLS or mean-pooled patches
  layer_decay.py    layer-wise lr decay (MAE's param_groups_lrd) on training/optim.py's AdamW
  linear_head.py    LP-FT: the head fitted as a linear probe on frozen features
  step.py           the state, the jitted update and prediction, laid out on the mesh
  scoring.py        validation metrics, which step is better, the test rows with intervals
  best.py           the kept step: best/params and best/best.json
  report.py         test/report.json, report.md, predictions.csv

The step loop is training/loop.py's, the one pretraining runs.
"""
