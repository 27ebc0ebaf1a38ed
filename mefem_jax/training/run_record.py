"""What a run is across its resumes: the settings a resume may change, the data it trains on, and the
record of every change in the workdir.

A resume continues the steps of a checkpoint, so it must compute what the run would have computed had it
never stopped. Each checkpoint keeps the config it was saved under and the identity of its training data;
a resume compares the command's config with them before any array is read:

* keys of `RESUMABLE` may change freely: they say how long the run goes, how often it logs, saves and
  probes, and how fast the host feeds it, never what a step computes;
* keys of `FIXED` (and the model's shape keys, `checkpoint.check_compatible`) can never change: the
  saved state or data position cannot be read under another value;
* any other change (batch size, mask strategy, learning rate, seeds, other data) is refused in one line
  naming key, checkpoint value and this run's value, unless `--allow_config_change=KEY[,KEY...]` names
  it. The run then goes on under the new value.

Every change a resume makes, allowed by the table or by the flag, is appended to
WORKDIR/config_history.jsonl (one line per resume: step, time, and per key the old and new value and
what allowed it); config.json holds the config of the latest start. The config of the steps before a
change is therefore config.json with the later history lines undone, and each checkpoint keeps its own.

Data identity: a shard folder is its manifest's `fingerprint` (a rebuilt folder under the same path is
other data; the same build moved elsewhere is not), any other spec (synthetic, tfds:NAME, a glob of
shards) the spec's text. A gs:// folder's manifest is read on its mount (data/gcs.py). A mixture is
the list of its parts, in order, each a source's identity and its normalised weight: the same sources
and weights are the same data wherever the folders now are; another source, weight or order is not.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

from etils import epath

from mefem_jax.config_checks import ConfigError
from mefem_jax.data import gcs, mixture
from mefem_jax.data import manifest as manifest_lib
from mefem_jax.training.checkpoint import ABSENT_MEANS, check_compatible

HISTORY_NAME = "config_history.jsonl"
ALLOW_FLAG = "--allow_config_change"

# What a resume may change, each with why the steps compute the same under another value. An entry is a
# key or a whole section ("eval" covers eval.every_steps, eval.train, ...).
RESUMABLE = {
    "total_steps": "where the run ends (not below the resumed step); the remaining steps' lr, wd and EMA "
                   "schedules follow the new length",
    "log_every": "how often metrics are pulled from the device and logged",
    "checkpoint": "how often the run saves and how many saves it keeps",
    "eval": "the probes read the target encoder and never update it: cadence, data, targets, readouts",
    "data.prefetch": "batches queued per worker: the same batches in the same order",
    "data.read_threads": "decode threads: the same batches in the same order",
    "data.read_buffer": "read-ahead of those threads: the same batches in the same order",
    "data.max_consecutive_failures": "when a broken source stops the run, not what its batches hold",
    "data.return_ids": "adds ids to the host batches; the step never sees them",
    "data.synthetic_eval_size": "read by the probes only",
    "mesh": "how the step is laid out over devices; a checkpoint restores onto any mesh",
    "model.remat": "recomputes activations in the backward pass: the same gradients, less memory",
    "init_from": "read only when a run starts at step 0; a resume continues from its checkpoint",
    "init": "fine-tuning's encoder: read only when a run starts at step 0 (its shape is model.*, checked apart)",
    "data.test": "fine-tuning's test split: scored once after the last step, never read by one",
}
# What not even the flag can change: the checkpoint could not be restored under the new value.
FIXED = {
    "data.workers": "the saved data position is per worker process; Grain cannot restore it under another "
                    "count (start a new --workdir with --config.init_from=THIS_WORKDIR)",
}
# Compared as data identities (fingerprints), not as text.
DATA_KEY = "data.train"


class ResumeRefusedError(ValueError):
    """A resume would change what the run computes; one line naming each key, old and new value."""


def settings(config_json: dict) -> dict[str, Any]:
    """A config (as JSON) flattened to dotted keys: {"data.batch_size": 32, ...}."""
    flat = {}
    for key, value in config_json.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in settings(value).items()})
        else:
            flat[key] = value
    return flat


def _covers(entry: str, key: str) -> bool:
    return key == entry or key.startswith(entry + ".")


def resumable(key: str) -> bool:
    return any(_covers(entry, key) for entry in RESUMABLE)


def config_settings(config) -> dict[str, Any]:
    return settings(json.loads(config.to_json_best_effort()))


def check_allowed_names(config, names: Sequence[str]) -> None:
    """`--allow_config_change` names keys or sections of the config; a typo is refused at start-up,
    before the workdir is touched, like an unknown --config.key."""
    keys = config_settings(config)
    unknown = [n for n in names if not any(_covers(n, k) for k in keys)]
    if unknown:
        raise ConfigError(f"{ALLOW_FLAG} names {', '.join(unknown)}, which is not a config key or section")


def _source_identity(spec: str) -> dict:
    """A shard folder's fingerprint, else the spec's text."""
    folder = gcs.local_path(spec)  # gs:// shards are read on their mount; its absence is refused elsewhere
    if os.path.isfile(os.path.join(folder, manifest_lib.MANIFEST_NAME)):
        return {"spec": spec, "fingerprint": manifest_lib.read_manifest(folder).get("fingerprint")}
    return {"spec": spec}


def data_identity(spec: str) -> dict:
    """What names the training data: a source's identity, or for a mixture its text and the identity
    and normalised weight of each part."""
    spec = str(spec).strip()
    parts = mixture.parse(spec)
    if parts is None:
        return _source_identity(spec)
    return {"spec": spec, "mixture": [dict(_source_identity(p.spec), weight=p.weight) for p in parts]}


def _same_source(old: dict, new: dict) -> bool:
    if old.get("fingerprint") and new.get("fingerprint"):  # the same build, wherever the folder now is
        return old["fingerprint"] == new["fingerprint"]
    return old.get("spec") == new.get("spec")  # a checkpoint saved before identities were kept has its text


def same_data(old: dict, new: dict) -> bool:
    if "mixture" not in old and "mixture" not in new:
        return _same_source(old, new)
    parts_old, parts_new = old.get("mixture", []), new.get("mixture", [])
    return (len(parts_old) == len(parts_new) and
            all(a["weight"] == b["weight"] and _same_source(a, b) for a, b in zip(parts_old, parts_new)))


def _describe_source(identity: dict) -> str:
    fingerprint = identity.get("fingerprint")
    return f"{identity['spec']} (fingerprint {fingerprint[:12]})" if fingerprint else repr(identity["spec"])


def _describe_data(identity: dict) -> str:
    if "mixture" not in identity:
        return _describe_source(identity)
    return "the mixture " + "; ".join(f"{_describe_source(p)} x{p['weight']:.4g}" for p in identity["mixture"])


@dataclass(frozen=True)
class Change:
    old: Any
    new: Any
    by: str  # "resumable" (RESUMABLE) or the flag that allowed it

    def as_json(self, key: str) -> dict:
        return {"key": key, "old": self.old, "new": self.new, "by": self.by}


class ResumeCheck:
    """`Checkpointer.restore_latest`'s `accept`: given what a checkpoint saved beside its state, returns the
    changes this run makes to it ({key: Change}), or raises before anything is restored."""

    def __init__(self, config, workdir, allowed: Sequence[str] = ()):
        self.config = config
        self.workdir = workdir
        self.allowed = tuple(allowed)
        self.current = config_settings(config)
        self.data = data_identity(config.data.train)

    def __call__(self, step: int, saved: dict) -> dict[str, Change]:
        if saved.get("config") is None:  # unreadable: the state restore that follows reports it
            return {}
        check_compatible(saved["config"], self.config)  # the model's shape: never, flag or not
        old = settings(saved["config"])
        diffs = {}
        for key in sorted(set(old) | set(self.current)):
            if key == DATA_KEY:
                continue
            absent = ABSENT_MEANS.get(tuple(key.rsplit(".", 1)))
            if (key not in old or key not in self.current) and absent is None:
                continue  # a key added or removed by a code update: the checkpoint cannot say what it was
            before, after = old.get(key, absent), self.current.get(key, absent)
            if before != after:
                diffs[key] = (before, after)
        saved_data = saved.get("data_identity") or {"spec": old.get(DATA_KEY)}  # older checkpoints: its text
        if not same_data(saved_data, self.data):
            diffs[DATA_KEY] = (saved_data, self.data)
        return self._judge(step, diffs)

    def _judge(self, step: int, diffs: dict[str, tuple]) -> dict[str, Change]:
        fixed = [k for k in diffs if k in FIXED]
        refused = [k for k in diffs if k not in FIXED and not resumable(k)
                   and not any(_covers(name, k) for name in self.allowed)]
        if fixed or refused:
            parts = [self._describe(k, *diffs[k]) + f" (cannot change on a resume: {FIXED[k]})" for k in fixed]
            parts += [self._describe(k, *diffs[k]) for k in refused]
            advice = "restore the settings or use a new --workdir"
            if refused:
                advice += f", or pass {ALLOW_FLAG}={','.join(refused)} to go on and record the change in {HISTORY_NAME}"
            raise ResumeRefusedError(f"resuming {self.workdir} from step {step} would change what its steps "
                                     f"compute: {'; '.join(parts)}; {advice}")
        return {k: Change(old, new, "resumable" if resumable(k) else ALLOW_FLAG)
                for k, (old, new) in diffs.items()}

    @staticmethod
    def _describe(key: str, old, new) -> str:
        if key == DATA_KEY:
            return f"{key}: checkpoint trained on {_describe_data(old)}, this run reads {_describe_data(new)}"
        return f"{key}: checkpoint has {old!r}, this run has {new!r}"


def write(workdir, config, start: int, changes: dict[str, Change] | None) -> None:
    """The run's record once its start is settled: config.json (this start's config) and the history.

    History lines at or after `start` belong to starts whose steps are being redone (a run that resumed,
    changed a setting and stopped before its next save; a fallback to an older checkpoint): they are
    dropped, like the metrics rows after the checkpoint, so the history has each change once.
    """
    workdir = epath.Path(workdir)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    path = workdir / HISTORY_NAME
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] < start]
    if changes:
        kept.append(json.dumps({"step": start, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                "changes": [c.as_json(k) for k, c in sorted(changes.items())]}))
    if kept != lines:
        path.write_text("".join(line + "\n" for line in kept))
