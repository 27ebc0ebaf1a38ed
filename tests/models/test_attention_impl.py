"""model.attention: the default and "auto" are today's XLA call where cuDNN cannot run; "cudnn" is refused
there in one line, at start-up. No cuDNN runs on this machine: its choice is tested on stated platform facts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.faces import load_faces, require_utkface, utkface_rows
from helpers.repo import REPO
from helpers.tiny_configs import tiny_config

from mefem_jax.config import validate_config
from mefem_jax.config_checks import ConfigError
from mefem_jax.models import attention_impl
from mefem_jax.models.attention_impl import AttentionImplError, check_attention, resolve
from mefem_jax.models.predictor import Predictor, predictor_from_config
from mefem_jax.models.vit import ViT, encoder_from_config
from mefem_jax.training.run_record import ResumeCheck

HOPPER = ("gpu", "cuda 12080", (9, 0))
AMPERE = ("gpu", "cuda 12080", (8, 0))


def _masked_softmax_attention(q, k, v, mask):
    """float64 numpy reference: softmax over the valid keys only, q/k/v [B, T|S, N, H], mask [B, 1, 1, S]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, v)


def test_xla_and_auto_are_the_call_made_before_the_knob_with_padding():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 7, 2, 8)), jnp.float32) for _ in range(3))
    valid = np.ones((3, 7), bool)
    valid[0, 0] = False       # a hidden CLS: the valid keys are not all first
    valid[1, 5:] = False      # padding slots at the end
    mask = jnp.asarray(valid[:, None, None, :])
    before = jax.nn.dot_product_attention(q, k, v, mask=mask)
    for requested in ("xla", "auto"):
        np.testing.assert_array_equal(attention_impl.dot_product_attention(q, k, v, mask, requested), before)
    np.testing.assert_allclose(before, _masked_softmax_attention(q, k, v, valid[:, None, None, :]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(attention_impl.dot_product_attention(q, k, v, None, "auto"),
                                  jax.nn.dot_product_attention(q, k, v))


def test_cudnn_equals_xla_with_masks_and_padding_where_cudnn_runs():
    """On a CUDA GPU only (skipped elsewhere): cuDNN's forward and gradients match XLA's in bfloat16 with a
    hidden first key and padded keys, at an even and at an odd masked length (T = S = 50, 49; head dim 64)."""
    if (reason := attention_impl.cudnn_refusal(jnp.bfloat16, 64)) is not None:
        pytest.skip(reason)
    rng = np.random.default_rng(0)
    valid = np.ones((4, 50), bool)
    valid[0, 0], valid[1, 30:], valid[2, ::3] = False, False, False
    for length in (50, 49):
        q, k, v = (jnp.asarray(rng.standard_normal((4, length, 2, 64)), jnp.bfloat16) for _ in range(3))
        mask = jnp.asarray(valid[:, None, None, :length])

        def loss(q, k, v, requested, mask=mask):
            out = attention_impl.dot_product_attention(q, k, v, mask, requested)
            return jnp.sum(out.astype(jnp.float32) ** 2), out

        grads = {r: jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)(q, k, v, r)
                 for r in ("xla", "cudnn")}
        for got, want in zip(jax.tree.leaves(grads["cudnn"]), jax.tree.leaves(grads["xla"])):
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                       rtol=0.05, atol=0.05, err_msg=f"length {length}")


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    require_utkface()
    return load_faces([require_utkface() / "images" / r["file"] for r in utkface_rows(3)], 64)


def _jaxprs(models: dict, params, args) -> dict[str, str]:
    return {name: str(jax.make_jaxpr(m.apply)({"params": params}, *args)) for name, m in models.items()}


def test_encoder_default_xla_and_auto_agree_bit_for_bit_on_faces(faces, random_params, forward):
    """A 64 px encoder (4x4 grid) on real faces: the full image, and subsets with padding and a hidden CLS.
    "auto" resolves when traced: on this backend its program is the default's, op for op, in either layout."""
    idx = np.array([[0, 5, 10, 15, 3], [1, 2, 3, 4, 0], [6, 7, 8, 9, 11]], np.int32)
    valid = np.array([[True] * 5, [True] * 3 + [False] * 2, [True] * 4 + [False]])
    masked = (faces, idx, valid, np.array([True, False, True]))
    for scan in (False, True):
        models = {name: ViT(width=32, depth=1, heads=2, patch_size=16, image_size=64, scan=scan, **kw)
                  for name, kw in [("default", {}), ("xla", {"attention": "xla"}), ("auto", {"attention": "auto"})]}
        params = random_params(jax.eval_shape(models["default"].init, jax.random.key(0), faces)["params"])
        for args in ((faces,), masked):
            jaxprs = _jaxprs(models, params, args)
            assert jaxprs["xla"] == jaxprs["default"] and jaxprs["auto"] == jaxprs["default"], (scan, len(args))
    np.testing.assert_array_equal(forward(models["auto"], params, *masked), forward(models["default"], params, *masked))


def test_predictor_default_and_auto_agree_bit_for_bit_with_padding(random_params, forward):
    rng = np.random.default_rng(1)
    inputs = (rng.standard_normal((2, 5, 32)).astype(np.float32), np.array([[0, 1, 2, 3], [15, 14, 13, 12]], np.int32),
              np.array([[True] * 4, [True, True, False, False]]), np.array([True, False]),
              np.array([[8, 9, 10], [0, 1, 2]], np.int32), np.array([[True, True, False], [True] * 3]))
    default = Predictor(out_width=32, width=16, depth=1, heads=2, grid=(4, 4))
    models = {"default": default, "xla": default.clone(attention="xla"), "auto": default.clone(attention="auto")}
    params = random_params(jax.eval_shape(default.init, jax.random.key(0), *inputs)["params"])
    jaxprs = _jaxprs(models, params, inputs)
    assert jaxprs["xla"] == jaxprs["default"] and jaxprs["auto"] == jaxprs["default"]
    np.testing.assert_array_equal(forward(models["auto"], params, *inputs), forward(default, params, *inputs))


def test_every_attention_call_gets_the_knob(faces):
    """A "cudnn" module reaches cuDNN's refusal on this CPU when traced: the value is threaded to the call."""
    for scan in (False, True):
        vit = ViT(width=32, depth=1, heads=2, patch_size=16, image_size=64, scan=scan, attention="cudnn")
        with pytest.raises(AttentionImplError, match="cpu backend"):
            jax.eval_shape(vit.init, jax.random.key(0), faces)
        predictor = Predictor(out_width=32, width=16, depth=1, heads=2, grid=(4, 4), scan=scan, attention="cudnn")
        with pytest.raises(AttentionImplError, match="cpu backend"):
            jax.eval_shape(predictor.init, jax.random.key(0), np.zeros((1, 2, 32), np.float32),
                           np.zeros((1, 1), np.int32), np.ones((1, 1), bool), np.ones((1,), bool),
                           np.zeros((1, 1), np.int32), np.ones((1, 1), bool))


def test_auto_takes_cudnn_only_where_every_limit_holds():
    bf16 = jnp.bfloat16
    assert resolve("auto", bf16, 64, platform=HOPPER) == "cudnn"
    assert resolve("auto", jnp.float16, 64, platform=AMPERE) == "cudnn"
    for dtype, head_dim, platform in [
            (jnp.float32, 64, HOPPER),            # fp32 compute
            (bf16, 12, HOPPER),                   # head dim not a multiple of 8
            (bf16, 192, AMPERE),                  # over 128 before Hopper
            (bf16, 64, ("cpu", "", None)),
            (bf16, 64, ("gpu", "rocm 6.2", None))]:
        assert resolve("auto", dtype, head_dim, platform) == "xla"
        with pytest.raises(AttentionImplError) as err:
            resolve("cudnn", dtype, head_dim, platform)
        assert "model.attention='cudnn'" in str(err.value) and "auto" in str(err.value)
    assert resolve("cudnn", bf16, 192, platform=HOPPER) == "cudnn"
    assert resolve("xla", bf16, 64, platform=HOPPER) == "xla"


def test_padding_odd_lengths_to_even_changes_no_output_and_no_gradient():
    """What the cuDNN path does with an odd masked length, checked through XLA's kernel on this CPU: one
    extra key (masked) and query (dropped) leave outputs equal to float64 softmax over the valid keys, and
    the gradients equal the unpadded call's."""
    rng = np.random.default_rng(2)
    q, k, v, g = (jnp.asarray(rng.standard_normal((3, 7, 2, 8)), jnp.float32) for _ in range(4))
    valid = np.ones((3, 7), bool)
    valid[0, 0], valid[1, 4:], valid[2, ::2] = False, False, False  # hidden CLS, padding, scattered
    mask = jnp.asarray(valid[:, None, None, :])

    def padded(q, k, v):
        pq, pk, pv, pmask = attention_impl.pad_to_even_lengths(q, k, v, mask)
        assert pq.shape[1] == pk.shape[1] == pmask.shape[-1] == 8 and not np.asarray(pmask)[..., -1].any()
        return jax.nn.dot_product_attention(pq, pk, pv, mask=pmask)[:, :7]

    def plain(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask)

    with jax.default_matmul_precision("highest"):
        out, pull = jax.vjp(padded, q, k, v)
        want, pull_want = jax.vjp(plain, q, k, v)
        np.testing.assert_allclose(out, _masked_softmax_attention(q, k, v, valid[:, None, None, :]),
                                   rtol=1e-5, atol=1e-6)
        for got, ref in zip(pull(g), pull_want(g)):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    even = tuple(x[:, :6] for x in (q, k, v))  # already even: nothing is added
    assert all(a.shape == b.shape for a, b in zip(attention_impl.pad_to_even_lengths(*even, mask[..., :6]), even))


@pytest.mark.parametrize("dtype, head_dim, platform, reason", [
    (jnp.bfloat16, 64, ("cpu", "", None), "the cpu backend has no cuDNN"),
    (jnp.float32, 64, HOPPER, "model.dtype is float32"),
    (jnp.bfloat16, 36, HOPPER, "multiple of 8 and at most 256, got 36")])
def test_a_cudnn_request_that_cannot_run_is_one_line_with_the_way_out(dtype, head_dim, platform, reason):
    with pytest.raises(AttentionImplError) as err:
        check_attention("cudnn", dtype, (64, head_dim), platform)
    line = str(err.value)
    assert "\n" not in line and reason in line and "model.attention=auto" in line and "model.attention=xla" in line


def test_validation_and_model_build_refuse_cudnn_on_this_cpu_and_unknown_values():
    for value, error, words in [("cudnn", AttentionImplError, "cpu backend has no cuDNN"),
                                ("flash", ConfigError, "model.attention='flash' is not allowed")]:
        config = tiny_config(**{"model.attention": value})
        with pytest.raises(error) as err:
            validate_config(config)
        assert words in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(AttentionImplError):
            encoder_from_config(config.model)
        with pytest.raises(AttentionImplError):
            predictor_from_config(config.model, config.predictor)
    for value in ("xla", "auto"):
        config = tiny_config(**{"model.attention": value})
        validate_config(config)
        assert encoder_from_config(config.model).attention == value
        assert predictor_from_config(config.model, config.predictor).attention == value
    assert tiny_config().model.attention == "xla"


def test_a_checkpoint_saved_before_the_key_resumes_as_xla(tmp_path):
    config = tiny_config()
    saved = json.loads(config.to_json_best_effort())  # as checkpoints save it
    del saved["model"]["attention"]
    assert ResumeCheck(config, tmp_path)(1, {"config": saved}) == {}
    config.model.attention = "auto"  # a different kernel is a change the resume must be allowed to make
    with pytest.raises(ValueError, match="model.attention: checkpoint has 'xla', this run has 'auto'"):
        ResumeCheck(config, tmp_path)(1, {"config": saved})


def test_train_refuses_cudnn_on_cpu_in_one_line_and_leaves_no_workdir(tmp_path):
    workdir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "mefem_jax.train", "--config=configs/vits.py:smoke",
                           "--config.model.attention=cudnn", f"--workdir={workdir}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "model.attention" in line]
    assert len(lines) == 1 and lines[0].startswith("train: ") and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not workdir.exists()
