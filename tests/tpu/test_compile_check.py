"""The train step compiled for Cloud TPU slices on this CPU (libtpu, the `tpu` extra): slice names, HBM
fit, the shardings XLA received, the collectives FSDP must produce, and the batch search.

A tiny model keeps each compile to seconds; the real recipes are in benchmarks/tpu_fit.py."""
import json
import subprocess
import sys

import jax
import pytest
from helpers.affine_compiler import AffineCompiler
from helpers.tiny_configs import tiny_config

from helpers.repo import REPO
from mefem_jax.tpu import compile as tpu_compile
from mefem_jax.tpu import topologies
from mefem_jax.tpu.batch_search import find_max_batch
from mefem_jax.training import sharding

ROOT = REPO
pytest.importorskip("libtpu", reason="compiling for TPU needs the tpu extra: pip install -e '.[tpu]'")


def tpu_config(fsdp: int = 1, batch: int = 32):
    """The tests' tiny run in bfloat16, as a TPU would run it, with even its small kernels sharded."""
    return tiny_config(**{"model.dtype": "bfloat16", "data.batch_size": batch, "mesh.fsdp": fsdp,
                          "mesh.min_fsdp_size": 256})


@pytest.fixture(autouse=True, scope="module")
def no_persistent_cache():
    """Executables compiled for a described topology cannot be loaded back from jax's disk cache
    (there is no TPU client): keep these compiles out of the test session's cache."""
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


@pytest.fixture(scope="module")
def v5e_4():
    tpu = topologies.parse("v5e-4")
    return tpu, topologies.devices(tpu)


def test_slice_names_map_to_xla_topologies():
    cases = {"v5p-64": ("v5:2x4x4", 32), "v5p-8": ("v5:2x2x1", 4), "v4-32": ("v4:2x2x4", 16),
             "v5e-16": ("v5e:4x4", 16), "v5litepod-256": ("v5e:16x16", 256), "v6e-8": ("v6e:2x4", 8)}
    for name, (xla, chips) in cases.items():
        tpu = topologies.parse(name)
        assert (tpu.xla_topology, tpu.chips) == (xla, chips), name
    assert topologies.parse("v5e-16", num_slices=2).devices_total == 32
    for bad in ("v5p-63", "v5e-3", "v7-8", "tpu", "v5p-"):
        with pytest.raises(topologies.UnknownTopologyError, match="known: .*v5p-64"):
            topologies.parse(bad)


def test_megacore_and_multislice_devices():
    assert len(topologies.devices(topologies.parse("v5p-8"))) == 4  # one device per chip
    two = topologies.devices(topologies.parse("v5e-4", num_slices=2))
    assert sorted({d.slice_index for d in two}) == [0, 1]
    import ml_collections

    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=4)), two)
    # fsdp stays within a slice (fast links); only the data axis crosses slices.
    for row in mesh.devices:
        assert len({d.slice_index for d in row}) == 1
    with pytest.raises(ValueError, match="one slice"):
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8)), two)


def test_fsdp_step_on_v5e_fits_with_rule_shardings_and_fsdp_collectives(v5e_4):
    tpu, devices = v5e_4
    config = tpu_config(fsdp=4)
    r, compiled = tpu_compile.check_with_executable(config, tpu, devices)
    b = r["per_device_bytes"]
    assert r["fits"] and 0 < b["argument"] <= b["peak"] < tpu.generation.hbm_bytes
    assert r["devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4}

    # The shardings the compiled executable takes are exactly what the rules give each parameter.
    from mefem_jax.training.run_setup import prepare

    run = prepare(config, devices)
    got = jax.tree.map(lambda s: s.spec, compiled.input_shardings[0][0].params)
    want = sharding.param_specs(run.abstract_state.params, 4, min_fsdp_size=256)
    assert jax.tree.map(lambda a, b: sharding.P(*a) == b, got, want,
                        is_leaf=lambda x: isinstance(x, sharding.P)) == jax.tree.map(lambda _: True, want)
    assert any(spec != sharding.P() for spec in jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, sharding.P)))

    # FSDP: weights are all-gathered and gradients reduce-scattered. Activations stay split by example
    # (models/activation_sharding.py), so no all-to-all reshuffles them inside attention.
    coll = r["collectives"]
    assert coll["all-gather"]["count"] > 0 and coll["reduce-scatter"]["count"] > 0
    assert coll["all-to-all"]["count"] == 0
    assert r["img_per_sec_per_chip_at_mfu"] * r["flops_per_step"] / r["batch"] == pytest.approx(
        tpu.generation.peak_bf16_flops * r["mfu"])


def test_data_parallel_step_on_v5p_all_reduces_and_gathers_nothing():
    tpu = topologies.parse("v5p-8")
    r = tpu_compile.check(tpu_config(fsdp=1), tpu)
    assert r["fits"] and r["mesh"] == {"data": 4, "fsdp": 1}
    assert r["collectives"]["all-reduce"]["count"] > 0  # the gradient reduction
    assert r["collectives"]["all-gather"]["count"] == 0  # replicated parameters are never gathered


def test_a_step_that_cannot_fit_fails_the_check_in_one_line(tmp_path):
    """A batch whose activations alone exceed a v5e chip's 16 GiB: exit status 1 and one stderr line
    naming the levers; the JSON report says why."""
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "mefem_jax.compile_check", "--config=configs/vits.py:smoke", "--topology=v5e-4",
           "--config.data.batch_size=1048576", f"--json={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("compile_check:")]
    assert len(ours) == 1 and "does not fit v5e-4" in ours[0] and "mesh.fsdp" in ours[0] and "remat" in ours[0]
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["hbm_bytes"] == 16 * 2 ** 30


def test_unknown_slice_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "mefem_jax.compile_check", "--config=configs/vits.py:smoke",
                           "--topology=v5p-63"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("compile_check: unknown TPU slice 'v5p-63'; known:")


def test_refusal_sizes_are_read_from_xla_messages():
    """Both kinds of XLA:TPU out-of-memory message seen in benchmarks/tpu_fit.jsonl."""
    quoted = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
              "(17.81G) exceeds available HBM (15.75G).")
    assert tpu_compile.refusal_sizes(quoted) == {"temp_required_bytes": int(17.81 * 2 ** 30),
                                                 "hbm_available_bytes": int(15.75 * 2 ** 30)}
    assert tpu_compile.refusal_sizes("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent "
                                     "error. Ran out of memory in memory space hbm. Used 15.76G of 15.75G hbm.") == {}


def _affine_compiler(fixed: float, per_example: float, limit: float):
    """A stand-in for `tpu.compile.check` with the memory behaviour measured on XLA:TPU
    (benchmarks/tpu_fit.jsonl): test_batch_search's synthetic compiler, of the config's batch."""
    by_batch = AffineCompiler(fixed, per_example, limit)
    return lambda config, tpu, devices, mfu: by_batch(config.data.batch_size)


@pytest.mark.parametrize("start", [32, 2048, 1 << 20])
def test_batch_search_closes_on_the_boundary_within_its_budget(monkeypatch, start):
    """From far below, near, and far above the boundary, six compiles bracket it within 5 %."""
    tpu = topologies.parse("v5e-4")
    limit = 15.75 * 2 ** 30  # what XLA:TPU offers of a v5e chip's 16 GiB
    monkeypatch.setattr(tpu_compile, "check", _affine_compiler(2e8, 1.2e5, limit))
    config = tpu_config(batch=start)
    check = tpu_compile.batch_checker(config, tpu, devices=[None] * 4)
    s = find_max_batch(check, config.data.batch_size, 4, tpu.generation.hbm_bytes, max_compiles=6)
    assert config.data.batch_size == start  # each probe compiled a copy
    true_max = int((limit - 2e8) / 1.2e5) // 4 * 4
    assert s["exact"] and s["compiles"] <= 6
    assert s["max_batch"] <= true_max < s["smallest_failing"]
    assert s["smallest_failing"] - s["max_batch"] <= 0.05 * s["max_batch"]
    assert s["max_batch"] % 4 == 0


@pytest.mark.slow
def test_find_max_batch_on_real_compiles(v5e_4):
    """Real XLA:TPU compiles (minutes near the limit, where XLA rematerialises to fit)."""
    tpu, devices = v5e_4
    check = tpu_compile.batch_checker(tpu_config(fsdp=1, batch=4096), tpu, devices)
    s = find_max_batch(check, 4096, len(devices), tpu.generation.hbm_bytes, max_compiles=5)
    probes = {int(b): p for b, p in s["probes"].items()}
    assert s["max_batch"] % 4 == 0 and probes[s["max_batch"]]["fits"]
    assert all(p["fits"] == (b <= s["max_batch"]) for b, p in probes.items())  # one boundary
    pts = sorted((b, p["per_device_bytes"]["peak"]) for b, p in probes.items() if "per_device_bytes" in p)
    assert all(p1 > p0 for (_, p0), (_, p1) in zip(pts, pts[1:]))  # more examples, more memory


def test_json_never_replaces_a_file_it_did_not_write(tmp_path):
    """Checked before compiling: a user's file at --json is refused in one line and left as it was."""
    theirs = tmp_path / "notes.json"
    theirs.write_text('{"mine": true}')
    proc = subprocess.run([sys.executable, "-m", "mefem_jax.compile_check", "--config=configs/vits.py:smoke",
                           "--topology=v5e-4", f"--json={theirs}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("is not a compile_check report; not replacing it")
    assert theirs.read_text() == '{"mine": true}'
