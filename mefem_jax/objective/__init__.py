"""The JEPA objective: what one step computes before the optimiser sees it.

Read in this order:
  losses.py  LN'd EMA targets, smooth-L1 (or L2), the circular weight matrix, CLS slot weights, SIGReg
  jepa.py    (params, target_params, images, rng) -> (loss, metrics): masks, encoders, predictor, loss
The masks come from `masking/`, the networks from `models/`; `training/train_step.py` wraps this in
the optimiser and EMA update.
"""
