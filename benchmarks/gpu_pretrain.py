"""Pretrain a real-size MeFEm encoder on a lent GPU for a given number of minutes, probe it as it learns, and
score it against its random-init twin and raw pixels: does the recipe learn faces at full model size?

    python3 benchmarks/gpu_pretrain.py --out=$OUT --minutes=4                      # the GPU machine
    nice -n 10 python benchmarks/gpu_pretrain.py --cpu --out=/tmp/gpu_pretrain_cpu  # here: toy sizes

--cpu reads the few hundred faces of runs/gpu_data_tiny (benchmarks/gpu_data.py's docstring builds it) and
runs every phase with a width-64, depth-2 ViT at 64 px: 250 s on 2 cores shared with a training job.

The model is ViT-S with 8 px patches at 112 px: 196 patches, the token count of ViT-S/16 at 224, so the masks
are the 14x14 layouts of the paper's recipe at a quarter of the pixels. The recipe is MeFEm-full as
`configs/vits.py` has it (axial stripes, circular loss weights, CLS reassignment; AdamW lr 1e-3 per 2048
images, which the optimiser scales linearly to the batch: 1.25e-4 at the batch of 256 here), run through
the real entry point `python -m mefem_jax.train`, in bf16, with 15 Grain workers on the 16 cores, and
attention as --attention says (default xla, the call every run so far made; auto tries cuDNN's). Two
things are shortened for a run of minutes, as in the `:cpu` recipe (mefem_jax/config.py): warm-up is 10 %
of the run and the target's EMA momentum runs 0.99 -> 0.999 (I-JEPA's 0.996 -> 1.0 is for 150k steps).

Phases (each with its own time limit, skipped when too little of --budget_s is left; each leaves a line in
summary.md, so nothing ends without one):
  setup      wheels from .whl/ into /tmp/site (the machine has no network), an import check, that JAX
             sees a GPU, and the versions (Python, jax, jaxlib, flax, optax, orbax, CUDA, cuDNN, driver)
             and the GPU's name, memory and clocks, in env.json.
  calibrate  the cosine schedules need total_steps up front, so a throwaway run of 60 steps (16 with
             --cpu) with the same settings measures the step rate (median img_per_sec of its metrics.jsonl rows
             after the first window and before the last, which holds the final save), the steady probe time
             (probe_seconds of its last probe) and the fixed cost (wall time minus steps and that probe:
             start-up, compile, the first probe with its image loading, the final save).
  train      total_steps = (60 * minutes * 0.95 - fixed cost - probes * probe time) * img/s / batch, with
             --probes probes after the one at step 0 (every total_steps / probes steps, each also a
             checkpoint). Probes: linear probes of the CLS readout fitted on --probe_train (at most 1,000
             faces) and scored on --probe_val, plus RankMe, as the train loop reports them. The probe fits
             run on one CPU core while the GPU waits: on real width-384 embeddings of 2,000 faces the CLS
             probes took 21 s of a core here, the mean-pool and 2x2-grid ones 22 s and 69 s more, which
             at four probes and two in calibration would leave no time to train. The run keeps the target
             encoder of the probed step where --select is best (eval.select, WORKDIR/selected/): a long
             run's CLS can narrow after it peaks (docs/RESULTS.md, the 3,000-step run). At its time limit
             the run gets SIGTERM, saves its step and stops (exit 3), so evaluation still has an encoder.
  eval       `python -m mefem_jax.evaluate` on that selected encoder (the last checkpoint's when there is
             none) and, in parallel, on its random
             twin with the raw-pixel baseline: probes fitted on --probe_fit (2,000 faces: at 5,000 the
             grid probes of one encoder took 5.6 minutes of a core here), scored once on --probe_test;
             then scripts/summarize_curves.py (curves and tables) and scripts/paired_compare.py
             (pretrained - random, paired over the test faces, every readout, from per_face.csv).

--phase=all runs them in one command of at most --budget_s (560 s), holding 170 s of it for eval: about
30 s of setup, 90 s of calibration, --minutes of training and 2-3 minutes of evaluation. The device tool
stops a command at 10 minutes, so a longer pretraining is --phase=train in one call and --phase=eval in
the next. The checkpoints (ViT-S state, ~0.4 GB) cannot come back and stay in --work on the machine, so
the second call must come while it is still warm (it is given back 30 s after a call); hence one call.

GPU session (the device tool's `run`; the bundle and the wheels are built here by benchmarks/gpu_data.py;
15 device minutes in all, machine start included):
  run(command="python3 benchmarks/gpu_pretrain.py --out=$OUT --minutes=4",
      carry=["runs/gpu_data", ".whl"], timeout_s=600)
or split, the second call at once (~8 minutes for setup, calibration and 5 of training, ~4 for the second
call, 1-2 for the machine's start: the 15 device minutes leave no room for more training than this):
  run(command="python3 benchmarks/gpu_pretrain.py --out=$OUT --phase=train --minutes=5",
      carry=["runs/gpu_data", ".whl"], timeout_s=600)
  run(command="python3 benchmarks/gpu_pretrain.py --out=$OUT --phase=eval --budget_s=240",
      carry=["runs/gpu_data", ".whl"], timeout_s=270)

Outputs: everything in --work/results (kept on the machine between calls), and in --out at most 8 files
(the device tool returns no more): summary.md, env.json, learning_curves.png, learning_curves_table.md and
results.tar.gz (every log, metrics.jsonl, config.json, evaluate's reports, plots and per_face.csv).
(`--versions` alone prints env.json's versions; the setup phase runs it in the phases' environment.)
Exit status: 0 every phase ran, 1 one failed (summary.md names it), 2 bad input, 3 stopped by a signal.
Other face sets: --pretrain_data (shards), --probe_train/--probe_val/--probe_fit/--probe_test (any data
spec, mefem_jax/evaluation/data.py) and --targets.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = ".gpu_pretrain"  # marks a --work folder this script made, the only kind it empties
TARGETS = "age:regression,gender:classification,race:classification"
NOISE = re.compile(r"^[IW]\d{4} ")  # absl's INFO and WARNING lines
# The readout probed during training: the others cost the GPU minutes of idle CPU fits (module docstring).
TRAIN_PROBE_FEATURES = "cls"
MODULES = "grain, array_record, ml_collections, simplejpeg, tensorboardX, sklearn, matplotlib, flax, optax, jax"


@dataclasses.dataclass(frozen=True)
class Mode:
    """The sizes of one mode: the real run on a GPU, or the same phases at toy sizes on a CPU."""
    config: str             # --config of the entry point; its model keys must not be None to be overridden
    model: dict
    predictor: dict
    batch: int
    workers: int
    calib_steps: int
    calib_log_every: int
    log_every: int
    max_images: int         # probe images per split during training
    fit_faces: int          # --probe_fit's default size, from the pretraining shards
    eval_batch: int
    random_spec: str        # the same ViT at random init, for evaluate
    budget_s: int
    eval_reserve_s: int
    minutes: float
    probes: int             # probes during training after the one at step 0
    grace_s: int            # after SIGTERM, for the last save


GPU = Mode(config="configs/vits.py", model=dict(image_size=112, patch_size=8, dtype="bfloat16"), predictor={},
           batch=256, workers=15, calib_steps=60, calib_log_every=10, log_every=50, max_images=1000,
           fit_faces=2000, eval_batch=256, random_spec="random:vits@112:patch=8,seed=0", budget_s=560,
           eval_reserve_s=170, minutes=4, probes=4, grace_s=60)
# `:cpu` names the encoder's width, depth and heads (the recipe's are None, taken from the variant, and a
# None cannot be overridden on the command line); train_command's flags replace its schedules and probes.
CPU = Mode(config="configs/vits.py:cpu",
           model=dict(image_size=64, patch_size=8, width=64, depth=2, heads=2, dtype="float32"),
           predictor=dict(width=32, depth=1, heads=2), batch=16, workers=1, calib_steps=16, calib_log_every=4,
           log_every=5, max_images=200, fit_faces=300, eval_batch=64,
           random_spec="random:vits@64:patch=8,width=64,depth=2,heads=2,seed=0", budget_s=420,
           eval_reserve_s=110, minutes=2, probes=2, grace_s=30)


class UsageError(Exception):
    """Input that cannot make a run: one line, exit 2."""


@dataclasses.dataclass
class Child:
    """One phase's process, by the name of its log."""
    name: str
    proc: subprocess.Popen
    t0: float = dataclasses.field(default_factory=time.monotonic)


class Run:
    """The results folder, the clock, the summary and the child processes of one command."""

    def __init__(self, args: argparse.Namespace, mode: Mode):
        self.args, self.mode, self.start = args, mode, time.monotonic()
        self.work = Path(args.work).resolve()
        self.res = self.work / "results"
        self.out = Path(args.out).resolve()
        self.children: list[Child] = []
        self.failed: list[str] = []  # phases whose process failed, for the exit status
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
                        MEFEM_CACHE=str(self.work / "embeddings"))
        # No persistent compilation cache: a calibration that hit it would under-count the compile that
        # the training run (other total_steps, so another program) pays in full.
        if args.cpu:
            self.env["JAX_PLATFORMS"] = "cpu"

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def note(self, text: str) -> None:
        print(text, flush=True)
        with (self.res / "summary.md").open("a") as f:
            f.write(text + "\n")

    def call(self, name: str, cmd: list[str], limit: float, env: dict | None = None) -> tuple[int, float]:
        """Runs `cmd` with its log in results/logs/NAME.log; SIGTERM at `limit` s, SIGKILL after the grace."""
        return self.wait([self.spawn(name, cmd, env)], limit)[0]

    def spawn(self, name: str, cmd: list[str], env: dict | None = None) -> Child:
        with self.log(name).open("w") as log:
            # Its own process group (not its own session), so the whole tree can be stopped at once and the
            # device tool still ends it with this command.
            child = Child(name, subprocess.Popen(cmd, cwd=REPO, env=env or self.env, stdout=log,
                                                 stderr=subprocess.STDOUT, process_group=0))
        self.children.append(child)
        return child

    def wait(self, children: list[Child], limit: float) -> list[tuple[int, float]]:
        """(exit status, seconds) of each child, all stopped by `limit` s from now."""
        deadline = time.monotonic() + limit
        for child in children:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.note(f"{child.name}: time limit of {limit:.0f} s reached; SIGTERM (the train loop saves first)")
                child.proc.send_signal(signal.SIGTERM)  # the main process only: Grain's workers outlive the save
                try:
                    child.proc.wait(timeout=self.mode.grace_s)
                except subprocess.TimeoutExpired:
                    os.killpg(child.proc.pid, signal.SIGKILL)
                    child.proc.wait()
        results = []
        for child in children:
            self.children.remove(child)
            rc, seconds = child.proc.returncode, time.monotonic() - child.t0
            if rc != 0:
                self.note(f"{child.name}: exit {rc} after {seconds:.0f} s: {last_line(self.log(child.name))}")
            if rc != 0 and not (child.name == "train" and rc == 3):  # 3: stopped at its limit and saved
                self.failed.append(child.name)
            results.append((rc, seconds))
        return results

    def log(self, name: str) -> Path:
        return self.res / "logs" / f"{name}.log"

    def stop_children(self) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                os.killpg(child.proc.pid, signal.SIGKILL)

    def publish(self) -> None:
        """What the device tool brings back: the summary and small files in --out, all else in one archive."""
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("summary.md", "env.json", "learning_curves.png", "learning_curves_table.md"):
            if (self.res / name).is_file():
                shutil.copy2(self.res / name, self.out / name)
        with tarfile.open(self.out / "results.tar.gz.tmp", "w:gz") as tar:
            tar.add(self.res, arcname="results")
        (self.out / "results.tar.gz.tmp").replace(self.out / "results.tar.gz")


def last_line(path: Path) -> str:
    """The log's last line that is not an absl INFO/WARNING line or a progress bar."""
    try:
        lines = [x for x in path.read_text(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    useful = [x for x in lines if not NOISE.match(x) and "it/s]" not in x and "step/s]" not in x]
    return (useful or lines or ["(empty log)"])[-1].strip()[:300]


def read_metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line of a killed run
            pass
    return rows


def number(row: dict, key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def setup(run: Run) -> bool:
    """Wheels, imports, the GPU and the versions; False when the run cannot go on."""
    wheels = sorted(Path(run.args.wheels).glob("*.whl")) if run.args.wheels else []
    if wheels:
        site = Path(run.args.site)
        rc, _ = run.call("wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                                    *map(str, wheels)], 120)
        if rc != 0:
            return False
        run.env["PYTHONPATH"] = f"{site}{os.pathsep}{REPO}"
    rc, _ = run.call("env", [sys.executable, __file__, "--versions"], 180)
    found = [x for x in run.log("env").read_text().splitlines() if x.startswith("ENV ")]
    if rc != 0 or not found:
        run.note(f"setup: the imports failed ({last_line(run.log('env'))}); are .whl/ and its carry there?")
        return False
    info = json.loads(found[-1][4:])
    info["gpu"] = nvidia_smi()
    (run.res / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    cuda = ", ".join(f"{k} {info[k]}" for k in ("cuda_runtime", "cuda_driver", "cudnn") if k in info)
    run.note(f"- machine: {info['gpu'] or 'no nvidia-smi'}; {os.cpu_count()} CPUs\n"
             f"- Python {info['python']}, jax {info.get('jax')}, jaxlib {info.get('jaxlib')}, flax {info.get('flax')}, "
             f"optax {info.get('optax')}, orbax {info.get('orbax-checkpoint')}; backend {info['backend']} "
             f"({info['device_kind']}){'; ' + cuda if cuda else ''}")
    if not run.args.cpu and info["backend"] != "gpu":
        run.note(f"setup: JAX sees no GPU (backend {info['backend']}); stopping")
        return False
    return True


def versions() -> dict:
    """What this process imports and runs on (in the phases' environment: `--versions` prints it)."""
    import importlib
    import importlib.metadata as md
    import platform

    for module in MODULES.split(", "):  # a missing one fails here, before any phase spends time
        importlib.import_module(module)
    import jax

    info = dict(python=platform.python_version(), backend=jax.default_backend(),
                devices=[str(d) for d in jax.devices()], device_kind=jax.devices()[0].device_kind)
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "jax-cuda13-plugin",
                 "jax-cuda12-plugin", "nvidia-cudnn-cu13", "nvidia-cudnn-cu12"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:  # what the CUDA plugin reports it loaded; None without one
        from jax._src.lib import cuda_versions
    except ImportError:
        cuda_versions = None
    if cuda_versions is not None:
        queries = {key: getattr(cuda_versions, f"{key}_get_version", None)
                   for key in ("cuda_runtime", "cuda_driver", "cudnn", "cublas")}
        queries["compute_capability"] = lambda: cuda_versions.cuda_compute_capability(0)
        for key, read in queries.items():
            try:  # a library the plugin cannot load is a fact to record, not a reason to stop the run
                if read is not None:
                    info[key] = read()
            except Exception as e:  # noqa: BLE001 - whatever the private module raises
                info[key] = f"unavailable ({e.__class__.__name__})"
    info["environment"] = jax.print_environment_info(return_string=True)
    return info


def nvidia_smi() -> str:
    if not shutil.which("nvidia-smi"):
        return ""
    fields = "name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # a hung or broken nvidia-smi: the run goes on without it
        return ""
    return f"{fields}: {done.stdout.strip()}" if done.returncode == 0 else ""


def train_command(run: Run, workdir: Path, steps: int, every: int, log_every: int) -> list[str]:
    a, m = run.args, run.mode
    flags = {"seed": 0, "total_steps": steps, "log_every": log_every,
             "data.train": a.pretrain_data, "data.batch_size": m.batch, "data.workers": m.workers,
             "optim.warmup_steps": max(1, steps // 10), "optim.ema": "(0.99,0.999)",
             "checkpoint.every_steps": every, "checkpoint.max_to_keep": 2, "model.attention": a.attention,
             "eval.every_steps": every, "eval.train": a.probe_train, "eval.test": a.probe_val,
             "eval.targets": a.targets, "eval.features": TRAIN_PROBE_FEATURES, "eval.grid_size": 2,
             "eval.max_images": m.max_images, "eval.batch_size": m.eval_batch, "eval.select": a.select}
    flags.update({f"model.{k}": v for k, v in m.model.items()})
    flags.update({f"predictor.{k}": v for k, v in m.predictor.items()})
    return [sys.executable, "-m", "mefem_jax.train", f"--config={m.config}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in flags.items())]


def calibrate(run: Run) -> dict | None:
    """Step rate, steady probe time and fixed cost of a short run with the real settings."""
    m, workdir = run.mode, run.work / "calib"
    shutil.rmtree(workdir, ignore_errors=True)
    limit = min(run.left() - 60, 240 if not run.args.cpu else 180)
    if limit < 60:
        run.note(f"calibrate: skipped, {run.left():.0f} s of the budget left")
        return None
    cmd = train_command(run, workdir, m.calib_steps, m.calib_steps, m.calib_log_every)
    rc, wall = run.call("calibrate", cmd, limit)
    rows = read_metrics(workdir)
    if rows:
        shutil.copy2(workdir / "metrics.jsonl", run.res / "calib_metrics.jsonl")
    last = max((r["step"] for r in rows), default=0)
    rates = [number(r, "img_per_sec") for r in rows if m.calib_log_every < r["step"] < last]
    rates = [x for x in rates if x] or [x for x in (number(r, "img_per_sec") for r in rows) if x]
    probe_s = [number(r, "probe_seconds") for r in rows if r["step"] == last]
    if rc != 0 or not rates or not probe_s or probe_s[0] is None:
        run.note(f"calibrate: no step rate (exit {rc}, {len(rows)} metric rows); training skipped")
        return None
    rate = statistics.median(rates)
    overhead = wall - m.calib_steps * m.batch / rate - probe_s[0]
    first = next((number(r, "probe_seconds") for r in rows if r["step"] == 0), None)
    compile_s = next((number(r, "compile_s") for r in rows if number(r, "compile_s")), None)
    optim = json.loads((workdir / "config.json").read_text())["optim"]  # the recipe's lr, as the run read it
    cal = dict(img_per_sec=rate, probe_s=probe_s[0], first_probe_s=first, compile_s=compile_s,
               overhead_s=overhead, wall_s=wall, steps=m.calib_steps, lr=optim["lr"], ref_batch=optim["ref_batch"])
    run.note(f"- calibration, {m.calib_steps} steps of batch {m.batch} in {wall:.0f} s: {rate:,.0f} img/s, "
             f"compile {compile_s or 0:.0f} s, first probe {first or 0:.0f} s (image loading included), then "
             f"{probe_s[0]:.1f} s a probe; fixed cost {overhead:.0f} s")
    return cal


def plan(run: Run, cal: dict) -> dict | None:
    """total_steps for the minutes asked (or the budget left), with the probes and the fixed cost paid."""
    m, a = run.mode, run.args
    room = run.left() - (m.eval_reserve_s if a.phase == "all" else 15)
    train_s = min(60 * a.minutes, room)
    step_s = m.batch / cal["img_per_sec"]
    steps = int((0.95 * train_s - cal["overhead_s"] - a.probes * cal["probe_s"]) / step_s)
    if steps < 2 * a.probes:
        run.note(f"train: skipped, {train_s:.0f} s leaves room for {max(steps, 0)} steps")
        return None
    every = math.ceil(steps / a.probes)
    predicted = cal["overhead_s"] + a.probes * cal["probe_s"] + steps * step_s
    p = dict(steps=steps, every=every, warmup=max(1, steps // 10), train_s=train_s, predicted_s=predicted,
             limit_s=min(room, predicted * 1.25 + 30), batch=m.batch,
             lr_peak=cal["lr"] * m.batch / cal["ref_batch"])  # optim.scaled_lrs' linear rule
    (run.res / "plan.json").write_text(json.dumps(dict(p, calibration=cal), indent=1) + "\n")
    run.note(f"- plan: {train_s / 60:.1f} min -> total_steps {steps:,} (warm-up {p['warmup']}, probes every "
             f"{every}), {steps * m.batch:,} images; predicted {predicted:.0f} s, limit {p['limit_s']:.0f} s; "
             f"peak lr {p['lr_peak']:.3g} ({cal['lr']:g} per {cal['ref_batch']} images)")
    return p


def train(run: Run) -> None:
    run.note("\n## Pretraining")
    cal = calibrate(run)
    p = plan(run, cal) if cal else None
    if p is None:
        return
    workdir = run.work / "run" / "mefem_s0"
    shutil.rmtree(workdir, ignore_errors=True)
    rc, wall = run.call("train", train_command(run, workdir, p["steps"], p["every"], run.mode.log_every), p["limit_s"])
    rows = read_metrics(workdir)
    kept = run.res / "mefem_s0"  # the layout scripts/summarize_curves.py reads
    kept.mkdir(exist_ok=True)
    for name in ("metrics.jsonl", "config.json", "plots/loss.png"):
        if (workdir / name).is_file():
            shutil.copy2(workdir / name, kept / Path(name).name)
    steps = [r for r in rows if number(r, "loss") is not None]
    rates = [number(r, "img_per_sec") for r in steps[1:-1] if number(r, "img_per_sec")]
    if steps:
        how = {0: "finished", 3: "stopped at its limit, last save kept"}.get(rc, "failed")
        run.note(f"- training: exit {rc} ({how}) in {wall:.0f} s (predicted {p['predicted_s']:.0f}); "
                 f"step {steps[-1]['step']:,} of {p['steps']:,}, loss {steps[0]['loss']:.4f} -> "
                 f"{steps[-1]['loss']:.4f}, median {statistics.median(rates) if rates else float('nan'):,.0f} img/s")
    else:
        run.note(f"- training: exit {rc} after {wall:.0f} s, no step logged")
    run.note(probe_table(rows))
    if nvidia_smi():
        run.note(f"- GPU after training: {nvidia_smi()}")


def probe_table(rows: list[dict]) -> str:
    """The train loop's probes on the validation faces: the CLS readout's headline metrics and RankMe."""
    probes = [r for r in rows if "probe_seconds" in r]
    if not probes:
        return "(no probe rows)"
    keys = sorted(k for k in probes[-1] if k.startswith("probe_") and not k.endswith(("_mean", "_grid"))
                  and k != "probe_seconds") + ["rankme_cls", "rankme_patch", "probe_seconds"]
    lines = ["", "| step | " + " | ".join(k.replace("probe_", "") for k in keys) + " |",
             "|---:|" + "---:|" * len(keys)]
    for r in probes:
        lines.append(f"| {r['step']} | " + " | ".join(f"{r[k]:.3f}" if number(r, k) is not None else "-"
                                                       for k in keys) + " |")
    return "\n".join(lines + ["", "(CLS readout; evaluate adds the mean and grid readouts at the end)", ""])


def evaluate(run: Run) -> None:
    run.note("\n## Evaluation (probes fitted on --probe_fit, scored once on --probe_test)")
    a, m = run.args, run.mode
    workdir = run.work / "run" / "mefem_s0"
    models = {"random": m.random_spec}
    selected = workdir / "selected" / "selected.json"
    if selected.is_file():  # the step the validation probes picked (--select), not necessarily the last
        kept = json.loads(selected.read_text())
        models = {"mefem": str(workdir / "selected"), **models}
        run.note(f"- the pretrained encoder scored is step {kept['step']:,}'s, picked by validation {kept['select']} "
                 f"= {kept['val'][kept['select']]:.4g} among the probed steps")
    elif (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        models = {"mefem": str(workdir), **models}
        run.note("- no selected step (selected/): the pretrained encoder scored is the last checkpoint's")
    else:
        run.note(f"- no pretrained checkpoint in {workdir}: the random twin and pixels only")
    limit = min(run.left() - 20, 300)
    if limit < 60:
        run.note(f"eval: skipped, {run.left():.0f} s of the budget left")
        return
    env = dict(run.env, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # two processes share the GPU
    procs = []
    for name, spec in models.items():
        out = run.res / f"test_{name}_s0"
        shutil.rmtree(out, ignore_errors=True)
        features = "cls,mean,grid" + (",pixels" if name == "random" else "")
        procs.append(run.spawn(f"eval_{name}", [
            sys.executable, "-m", "mefem_jax.evaluate", f"--model={spec}", f"--out={out}", f"--train={a.probe_fit}",
            f"--test={a.probe_test}", f"--targets={a.targets}", f"--features={features}", "--grid_size=2",
            f"--batch_size={m.eval_batch}"], env))
    for (name, _), (rc, wall) in zip(models.items(), run.wait(procs, limit)):
        if rc == 0:
            run.note(f"- {name}: evaluated in {wall:.0f} s")
            run.note(report_table(run.res / f"test_{name}_s0" / "report.json", name))
    # The curves first: they come back as files of their own. paired_compare reads evaluate's per_face.csv
    # (no refitting), so pairing every readout takes seconds.
    if (run.res / "mefem_s0" / "metrics.jsonl").is_file():
        run.call("curves", [sys.executable, "scripts/summarize_curves.py", str(run.res), str(run.res)],
                 max(10.0, min(60.0, run.left())))
    both = [run.res / f"test_{n}_s0" for n in ("mefem", "random")]
    if all((d / "report.json").is_file() for d in both) and run.left() > 40:
        rc, _ = run.call("paired", [sys.executable, "scripts/paired_compare.py", *map(str, both),
                                    f"--targets={a.targets}", "--features=cls,mean,grid"], run.left() - 20)
        if rc == 0:
            run.note("\n### Pretrained - random init, paired over the test faces\n")
            run.note("\n".join(x for x in run.log("paired").read_text().splitlines() if x.startswith(("|", "A ="))))


def report_table(path: Path, label: str) -> str:
    """evaluate's headline metrics per target and readout, with their bootstrap intervals, and RankMe."""
    report = json.loads(path.read_text())
    headline = {"regression": ("mae", "r2"), "classification": ("accuracy", "roc_auc")}
    lines = ["", f"| {label} | readout | metric | value [95 % interval] |", "|---|---|---|---:|"]
    for row in report.get("probes", []):
        for metric in headline.get(row.get("kind"), tuple(row["metrics"])[:1]):
            value, ci = row["metrics"].get(metric), row.get("intervals", {}).get(metric)
            if isinstance(value, (int, float)):
                lines.append(f"| {row['target']} | {row['features']} | {metric} | {value:.3f}"
                             + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + " |")
    health = report.get("health", {})
    ranks = ", ".join(f"{k} {v:.1f}" for k, v in health.items() if k.startswith("rankme") and isinstance(v, float))
    return "\n".join(lines + ([f"\nRankMe on the test faces: {ranks}"] if ranks else []))


def default_select(targets: str) -> str:
    """The first target's headline probe metric on CLS, as the train loop logs it (online_probe.py)."""
    name, _, kind = targets.split(",")[0].partition(":")
    metric = {"regression": "mae", "classification": "acc", "survival": "c_index"}.get(kind.strip())
    if not name.strip() or metric is None:
        raise UsageError(f"--targets {targets!r}: the first must be NAME:regression|classification|survival, "
                         "or give --select")
    return f"probe_{name.strip()}_{metric}"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Mode]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="what comes back: summary.md, env.json, curves, results.tar.gz")
    p.add_argument("--cpu", action="store_true", help="every phase at toy sizes on this machine's CPU")
    p.add_argument("--phase", choices=("all", "train", "eval"), default="all")
    p.add_argument("--minutes", type=float, help="wall time of the pretraining run, compile and probes included "
                   "(default 4; 2 with --cpu); cut to what the budget leaves")
    p.add_argument("--budget_s", type=int, help="this command's own limit (default 560; 420 with --cpu)")
    p.add_argument("--probes", type=int, help="probes during training after the one at step 0 (default 4; 2 with "
                   "--cpu)")
    p.add_argument("--attention", default="xla", choices=("xla", "cudnn", "auto"), help="model.attention")
    p.add_argument("--data", help="the bundle of benchmarks/gpu_data.py (default runs/gpu_data; "
                   "runs/gpu_data_tiny with --cpu): DATA/train, DATA/val, DATA/test")
    p.add_argument("--pretrain_data", help="training shards (default DATA/train)")
    p.add_argument("--probe_train", help="data spec the probes during training are fitted on (default DATA/train)")
    p.add_argument("--probe_val", help="... and scored on (default DATA/val)")
    p.add_argument("--probe_fit", help="data spec the final probes are fitted on (default DATA/train:limit=2000; "
                   "300 with --cpu)")
    p.add_argument("--probe_test", help="... and scored once on (default DATA/test)")
    p.add_argument("--targets", default=TARGETS)
    p.add_argument("--select", help="the validation probe metric whose best step is scored on --probe_test "
                   "(eval.select; default the first target's MAE or accuracy on CLS, e.g. probe_age_mae)")
    p.add_argument("--work", help="checkpoints and results, kept between calls (default runs/gpu_pretrain[_cpu])")
    p.add_argument("--wheels", help="install the wheels here into --site first (default .whl; none with --cpu)")
    p.add_argument("--site", default="/tmp/site")
    args = p.parse_args(argv)
    mode = CPU if args.cpu else GPU
    data = Path(args.data or ("runs/gpu_data_tiny" if args.cpu else "runs/gpu_data"))
    data = data if data.is_absolute() else REPO / data
    defaults = dict(pretrain_data=data / "train", probe_train=data / "train", probe_val=data / "val",
                    probe_fit=f"{data / 'train'}:limit={mode.fit_faces}", probe_test=data / "test",
                    work=REPO / ("runs/gpu_pretrain_cpu" if args.cpu else "runs/gpu_pretrain"),
                    wheels="" if args.cpu else REPO / ".whl", minutes=mode.minutes, budget_s=mode.budget_s,
                    probes=mode.probes)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, str(value) if isinstance(value, Path) else value)
    args.select = args.select or default_select(args.targets)
    if args.minutes <= 0 or args.budget_s <= 0 or args.probes < 1:
        raise UsageError("--minutes, --budget_s and --probes must be positive")
    for spec in {args.pretrain_data, args.probe_train, args.probe_val, args.probe_test}:
        folder = Path(spec.split(":")[0])
        if folder.is_relative_to(data) and not (folder / "manifest.json").is_file():
            raise UsageError(f"no shard folder at {folder}: build the bundle with benchmarks/gpu_data.py "
                             "(and carry it)")
    work = Path(args.work)
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        raise UsageError(f"--work {work} holds files this script did not write; name another folder")
    return args, mode


def main(argv: list[str] | None = None) -> int:
    if (argv if argv is not None else sys.argv[1:]) == ["--versions"]:
        print("ENV " + json.dumps(versions()))
        return 0
    args, mode = parse_args(argv)
    run = Run(args, mode)
    run.work.mkdir(parents=True, exist_ok=True)
    (run.work / MARKER).touch()
    if args.phase != "eval":  # a new pretraining starts a new record
        shutil.rmtree(run.res, ignore_errors=True)
    (run.res / "logs").mkdir(parents=True, exist_ok=True)

    def on_term(signum, frame):
        raise SystemExit(3)

    signal.signal(signal.SIGTERM, on_term)
    status = 1  # also when setup fails
    try:
        run.note(f"# MeFEm pretraining on {'CPU (toy sizes)' if args.cpu else 'GPU'}, phase {args.phase}, "
                 f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}\n")
        model = ", ".join(f"{k}={v}" for k, v in mode.model.items())
        run.note(f"- {mode.config}, model {model}, predictor {mode.predictor or 'as configured'}, batch "
                 f"{mode.batch}, {mode.workers} data workers, attention {args.attention}\n"
                 f"- pretraining data {args.pretrain_data}\n"
                 f"- probes during training: fitted on {args.probe_train}, scored on {args.probe_val}\n"
                 f"- probes at the end: fitted on {args.probe_fit}, scored on {args.probe_test}\n"
                 f"- targets {args.targets}")
        if setup(run):
            if args.phase in ("all", "train"):
                train(run)
                run.publish()
            if args.phase in ("all", "eval"):
                evaluate(run)
            status = 1 if run.failed else 0
    except SystemExit as stop:
        status = int(stop.code or 0)
        run.note(f"stopped by a signal after {time.monotonic() - run.start:.0f} s")
    finally:
        run.stop_children()
        failed = f"; failed: {', '.join(run.failed)}" if run.failed else ""
        run.note(f"\ntotal {time.monotonic() - run.start:.0f} s of the {args.budget_s} s budget{failed}")
        run.publish()
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as err:
        print(f"gpu_pretrain: {err}", file=sys.stderr)
        sys.exit(2)
