"""The pieces behind `python -m mefem_jax.evaluate`: model and data specs, embeddings, probes,
verification, survival, reports, and the probe the train loop runs."""
