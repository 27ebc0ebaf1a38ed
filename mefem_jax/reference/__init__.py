"""PyTorch references the JAX code is checked against.

Needs the torch extra (`pip install -e ".[torch]"`). Nothing in the training path imports it: the parity
tests and the benchmarks do.
"""
