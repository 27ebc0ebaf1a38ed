"""`python -m mefem_jax.data.build_shards`: the shard builder's command, kept at the name users know.

The builder itself lives in `data/shards/` (build.py and the modules it names).
"""
import sys

from mefem_jax.data.shards.build import main

if __name__ == "__main__":
    sys.exit(main())
