"""The machinery of a training run, shared by `train` and `compile_check`.

Read in this order:
  optim.py          AdamW, the lr / weight-decay / EMA schedules
  sharding.py       the (data, fsdp) mesh, the sharding rules, global batches
  train_step.py     the model pieces and the jitted update (objective, optimiser, EMA)
  run_setup.py      the run before its first step: mesh, state layout, shardings, donated jit
  checkpoint.py     Orbax: train state + data iterator + config, async and atomic
  kept_step.py      the step a validation number picked, kept beside the rotating checkpoints
  run_record.py     what a resume may change, the identity of the training data, config_history.jsonl
  metric_writer.py  metrics.jsonl, TensorBoard, the loss plot
  loop.py           the step loop that pretraining and fine-tuning both run
"""
