"""Sharded training equals single-device training: meshes of 8 simulated CPU devices, two real processes
joined by jax.distributed, and the sharding rules themselves."""
import json
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers.repo import REPO
from mefem_jax.training import sharding

SCRIPT = REPO / "tests" / "helpers" / "sharded_steps.py"


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _rel(a, b):
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))


def test_spec_rules():
    # Largest divisible dimension gets the fsdp axis; small or indivisible leaves stay replicated.
    assert sharding.spec_for("encoder/blocks_0/mlp/fc1/kernel", (768, 3072), 8) == P(None, "fsdp")
    assert sharding.spec_for("encoder/blocks_0/mlp/fc2/kernel", (3072, 768), 8) == P("fsdp", None)
    assert sharding.spec_for("encoder/patch_embed/proj/kernel", (16, 16, 3, 768), 8) == P(None, None, None, "fsdp")
    assert sharding.spec_for("encoder/blocks_0/mlp/fc1/bias", (3072,), 8) == P()  # rule: replicate
    assert sharding.spec_for("encoder/norm/scale", (768,), 8) == P()
    assert sharding.spec_for("encoder/blocks_0/attn/qkv/kernel", (100, 300), 7) == P()  # 7 divides nothing
    assert sharding.spec_for("encoder/blocks_0/attn/qkv/kernel", (64, 192), 8) == P()  # under min size
    assert sharding.spec_for("encoder/blocks_0/attn/qkv/kernel", (768, 2304), 1) == P()  # no fsdp axis


def test_mesh_sizes_and_errors():
    devices = jax.devices()[:1]
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match="does not tile"):
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1)), devices)
    with pytest.raises(ValueError, match="both be -1"):
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=-1)), devices)


@pytest.mark.slow  # 90 s on 2 cores; in CI the two-process test's (2, 2) mesh keeps FSDP against one process
def test_sharded_step_matches_single_device_on_8_devices():
    """(8,1), (2,4) and (1,8) meshes: same losses and parameters as one device after 3 steps, and every
    parameter carries the PartitionSpec the rules assign (FSDP visible on the kernels). The model has the
    default scanned layers, so stacked kernels must split on a feature axis, never the layer axis; the
    two-process test below runs the unrolled layout."""
    out = subprocess.run([sys.executable, str(SCRIPT), "meshes", "--steps", "3", "--layers", "scan"], env=_env(8),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    ref = np.array(report["reference_losses"])
    assert set(report["meshes"]) == {"8,1", "2,4", "1,8"}
    for mesh, r in report["meshes"].items():
        np.testing.assert_allclose(r["losses"], ref, rtol=1e-5, err_msg=mesh)
        assert r["max_rel_param_err"] <= 2e-5, (mesh, r["max_rel_param_err"])
        assert r["specs"] == r["actual"], mesh
        fsdp = int(mesh.split(",")[1])
        qkv = r["actual"]["encoder/blocks/attn/qkv/kernel"]  # [layers, width, 3 * width]
        assert qkv == ("P(None, None, 'fsdp')" if fsdp > 1 else "P()"), (mesh, qkv)
        assert r["actual"]["encoder/blocks/attn/qkv/bias"] == "P()"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    """Two real processes (2 CPU devices each, gloo collectives, jax.distributed over localhost) each feed
    their half of the batch into a (2, 2) mesh; after 3 steps they agree with one 4-device process. Unrolled
    blocks here (`blocks_{i}`), so both parameter layouts are trained sharded somewhere in this file."""
    port = _free_port()
    common = ["run", "--mesh", "2,2", "--steps", "3", "--layers", "unrolled"]
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *common,
                               "--num_processes", "2", "--process_id", str(i), "--port", str(port),
                               "--out", str(tmp_path / "multi.npz")],
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    single = subprocess.run([sys.executable, str(SCRIPT), *common, "--out", str(tmp_path / "single.npz")],
                            env=_env(4), capture_output=True, text=True, timeout=900)
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-4000:]
    assert single.returncode == 0, single.stderr[-4000:]
    multi, ref = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
    np.testing.assert_allclose(multi["losses"], ref["losses"], rtol=1e-5)
    assert set(multi.files) == set(ref.files)
    assert "p:encoder/blocks_0/attn/qkv/kernel" in ref.files
    for k in ref.files:
        if k.startswith("p:"):
            assert _rel(multi[k], ref[k]) <= 1e-5, k
