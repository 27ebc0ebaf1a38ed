"""Evaluation images that are also in the pretraining data: near-duplicate photos between the two.

    python -m mefem_jax.data.leakage --pretrain=/data/utk_train[,SPEC...] \\
        --eval=../shared/data/utkface:split=test[,SPEC...] [--max_distance=D] [--max_leaked=N] [--out=leaks.csv]

A probe scored on faces the encoder was pretrained on measures memory as much as representation. This
lists every evaluation image with a near-duplicate in the pretraining data (`face_hash.py`: perceptual
hashes within --max_distance bits, mirror images included, exact copies at distance 0), as rows of
eval data, eval id, pretraining data, pretraining id, distance and kind (exact, near, mirror): a few on
stdout, all in --out.

--pretrain: shard folders (fingerprints read from their records; builds older than the fingerprints are
hashed on the fly), image folders with labels.csv or a CSV (the rows their options select) and image
folders without one (every image under them), all hashed on the fly. --eval: the same kinds, written as
evaluate's --test (evaluation/data.py). Commas separate the specs and a spec's own options alike:
`utk:split=test,limit=50,/data/more` is two specs (`evaluation.data.split_specs`).

Exit status: 0 when at most --max_leaked evaluation images (default 0) have a near-duplicate; 1 when more,
in one line saying how many; 2 on bad input (a spec that names no photos, an --out that exists and is not
a CSV of this command's, which it never replaces). `evaluate --exclude_leaked=PRETRAIN` drops the same
images from its test split.
"""
from __future__ import annotations

import csv
import logging
import os
import sys
from collections import Counter

from mefem_jax import cli
from mefem_jax.data import face_hash
from mefem_jax.evaluation.data import parse_data_spec, spec_hashes, split_specs

log = logging.getLogger("leakage")

PROG = "leakage"
COLUMNS = ("eval_data", "eval_id", "pretrain_data", "pretrain_id", "distance", "kind")
SHOWN = 10  # pairs printed per evaluation set; --out has them all


def _hashed(spec: str) -> face_hash.HashTable:
    table = spec_hashes(spec)
    skipped = {reason: len(ids) for reason, ids in table.skipped.items()}
    log.info("%s: %d images (%d fingerprints read from records, %d computed)%s", spec, len(table),
             len(table) - table.computed, table.computed, f", skipped {skipped}" if skipped else "")
    return table


def _check_out(path: str) -> None:
    """Refuses an --out that exists and is not a CSV this command wrote: it is never replaced."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"--out {path} is a folder; name a CSV file")
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline().strip()
        if first != ",".join(COLUMNS):
            raise FileExistsError(f"--out {path} exists and is not a leakage CSV (its first line is not "
                                  f"{','.join(COLUMNS)}); it is not replaced: pick another name")


def _write_csv(path: str, rows: list[tuple]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"  # renamed into place: a reader never sees half a list
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([COLUMNS, *rows])
    os.replace(tmp, path)


def main(argv) -> int:
    """Bad input (a ValueError: specs, flags; a missing path) is one line and status 2, through cli.run."""
    from absl import flags

    del argv
    f = flags.FLAGS
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("pretrain", "eval"):
        if not f[name].value:
            raise ValueError(f"--{name} is required")
    pretrain_specs, eval_specs = split_specs(f.pretrain), split_specs(f.eval)
    for spec in pretrain_specs + eval_specs:  # a typo fails now, not after hashing the data before it
        source = parse_data_spec(spec).source
        if not os.path.exists(source):
            raise FileNotFoundError(f"{spec}: {source} does not exist")
    if f.out:
        _check_out(f.out)
    pretrain = [_hashed(spec) for spec in pretrain_specs]  # hashed once for every evaluation set
    rows, leaked = [], 0
    for spec in eval_specs:
        found = face_hash.leaks(_hashed(spec), pretrain, f.max_distance)
        images = len({leak.eval_id for leak in found})
        leaked += images
        kinds = Counter(leak.kind for leak in found)
        print(f"{spec}: {images} image(s) with a near-duplicate in the pretraining data (distance <= "
              f"{f.max_distance}; {len(found)} pair(s): {dict(kinds) or 'none'})")
        for leak in found[:SHOWN]:
            print(f"  {leak.eval_id} ~ {leak.pretrain_id} in {leak.pretrain}: distance {leak.distance} ({leak.kind})")
        if len(found) > SHOWN:
            print(f"  ... and {len(found) - SHOWN} more pair(s)" + (f", in {f.out}" if f.out else "; --out lists them"))
        rows += [(spec, leak.eval_id, leak.pretrain, leak.pretrain_id, leak.distance, leak.kind) for leak in found]
    if f.out:
        _write_csv(f.out, rows)
        print(f"wrote {f.out}: {len(rows)} pair(s)")
    if leaked > f.max_leaked:
        print(f"{PROG}: {leaked} evaluation image(s) have a near-duplicate in the pretraining data, more than "
              f"--max_leaked={f.max_leaked}", file=sys.stderr, flush=True)
        return cli.EXIT_FAILED
    return cli.EXIT_FINISHED


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("pretrain", None, "The pretraining data: shard folders, image folders (with or without "
                        "labels.csv) or CSVs, comma-separated.")
    flags.DEFINE_string("eval", None, "The evaluation data: data specs as evaluate's --test, comma-separated.")
    flags.DEFINE_integer("max_distance", face_hash.NEAR_DISTANCE, "Hamming distance (of 63 bits) up to which two "
                         "faces count as one photo (face_hash.py).", lower_bound=0, upper_bound=63)
    flags.DEFINE_integer("max_leaked", 0, "Exit 1 when more evaluation images than this have a near-duplicate.",
                         lower_bound=0)
    flags.DEFINE_string("out", None, "CSV file listing every pair (replaced only if an earlier one of ours).")


if __name__ == "__main__":
    _define_flags()
    cli.run(PROG, main)
