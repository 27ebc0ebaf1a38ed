"""Mixtures of training data: several data specs read in fixed proportions.

    --config.data.train='/data/utk_train:0.7;gs://bucket/ffhq:0.2;tfds:celeb_a:0.1'

Grammar: items separated by `;`, each `SPEC:WEIGHT`, WEIGHT a number > 0 after the item's last `:`.
Weights are relative: normalised by their sum, and the normalised weights are what Grain mixes by and
what the run's data identity records (run_record.py). A text without `;` is one plain spec, as before.

Why `;` and a trailing `:WEIGHT`: `,` already separates the `key=value` options of the shared spec
grammar (spec_options.py) and `:` sits inside specs (`tfds:NAME:SPLIT`, `tfds:NAME:1.0.0`, `gs://`,
`synthetic:test`); no spec contains `;`, and no spec's last `:` part is a plain number (a TFDS version
has two dots, a split is a name, options hold `=`). One key, `data.train`, stays the run's data: its
identity check, `--allow_config_change=data.train` and the launcher's bucket mounts need nothing new.

Each source is shuffled and repeated on its own, then Grain's `MapDataset.mix` interleaves them
deterministically in the given proportions (pipeline.py), so any window of N examples holds each
source's share to within an example or two, and the mixture's position is one index that checkpoints
restore exactly. Per-source counts are logged as `data_decoded_<name>`; a source's name is derived
from its spec (`names`).

Nothing here imports Grain: the config checks parse mixtures at start-up (config.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

SEPARATOR = ";"
GRAMMAR = "one data spec, or a mixture 'SPEC:WEIGHT;SPEC:WEIGHT;...' with every WEIGHT a number > 0"


class MixtureError(ValueError):
    """A mixture whose items or weights cannot be read; one line naming the item."""


@dataclass(frozen=True)
class Part:
    spec: str
    weight: float
    name: str  # for the per-source counters: data_decoded_<name>


def is_mixture(text: str) -> bool:
    return SEPARATOR in str(text)


def _weight(item: str) -> tuple[str, float]:
    spec, sep, tail = item.rpartition(":")
    if not sep or not spec.strip():
        raise MixtureError(f"mixture item {item!r} has no weight; write it SPEC:WEIGHT")
    try:
        weight = float(tail)
    except ValueError:
        raise MixtureError(f"mixture item {item!r}: its weight {tail.strip()!r} (after the last ':') is not "
                           "a number; write it SPEC:WEIGHT") from None
    if not math.isfinite(weight) or weight <= 0:
        hint = " (leave a source out rather than weigh it 0)" if weight == 0 else ""
        raise MixtureError(f"mixture item {item!r}: weight {tail.strip()} is not a number > 0{hint}")
    return spec.strip(), weight


def _base_name(spec: str) -> str:
    """'tfds:celeb_a/align:1.0.0:train' -> 'celeb_a'; '/data/utk_train' -> 'utk_train';
    '/data/x/*.array_record' -> 'x'; 'synthetic:test' -> 'synthetic'."""
    if spec.startswith("tfds:"):
        stem = spec[len("tfds:"):].split(":")[0].split("/")[0]
    elif spec == "synthetic" or spec.startswith("synthetic:"):
        stem = "synthetic"
    else:
        parts = [p for p in re.split(r"[/\\]", spec.rstrip("/")) if p and not p.endswith(":")]
        while parts and (any(c in parts[-1] for c in "*?[") or parts[-1].endswith(".array_record")):
            parts.pop()  # a glob or a shard file is named by its folder
        stem = parts[-1] if parts else "data"
    return re.sub(r"[^a-z0-9_]+", "_", stem.lower()).strip("_") or "data"


def names(specs: list[str]) -> list[str]:
    """One counter name per spec, from the spec itself; repeats get _2, _3, ... in mixture order."""
    out, seen = [], {}
    for spec in specs:
        base = _base_name(spec)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return out


def parse(text: str) -> tuple[Part, ...] | None:
    """The parts of a mixture, weights normalised to sum 1; None for a plain spec.
    MixtureError for an item without a number > 0 as weight, an empty item, or a comma-separated
    mixture (a likely slip: `,` does not separate mixture items)."""
    text = str(text).strip()
    if not is_mixture(text):
        if re.search(r":\s*[0-9.]+\s*,", text):
            raise MixtureError(f"data spec {text!r} looks like a mixture: separate its items with "
                               f"'{SEPARATOR}', not ','")
        return None
    items = [item.strip() for item in text.split(SEPARATOR)]
    if any(not item for item in items):
        raise MixtureError(f"mixture {text!r} has an empty item (a doubled or trailing '{SEPARATOR}')")
    pairs = [_weight(item) for item in items]
    total = sum(w for _, w in pairs)
    return tuple(Part(spec, w / total, name)
                 for (spec, w), name in zip(pairs, names([s for s, _ in pairs])))


def source_names(text: str) -> list[str]:
    """The counter names of a mixture's sources, in order; [] for a plain spec (its counts are the run's)."""
    parts = parse(text)
    return [p.name for p in parts] if parts else []
