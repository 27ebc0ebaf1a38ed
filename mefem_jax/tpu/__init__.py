"""Cloud TPU tooling that runs on any machine: the train step compiled for a described slice.

Read in this order:
  topologies.py   the slice table: chips, HBM, peak FLOP/s, the XLA topology names
  flops.py        the analytic FLOPs of one train step
  collectives.py  the collectives a compiled step executes, counted from its HLO
  compile.py      one compile and its report (memory, FLOPs, collectives, images/s at an MFU)
  batch_search.py the largest global batch that fits, found with few compiles
  report.py       the report as text
The command is `python -m mefem_jax.compile_check`.
"""
