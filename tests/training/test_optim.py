"""Schedules, weight-decay masking and AdamW semantics against independent references.

The references are written from I-JEPA's schedule classes (WarmupCosineSchedule, CosineWDSchedule, the
momentum generator) in plain Python floats, and from torch.optim.AdamW itself.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mefem_jax.training import optim


def ijepa_lr(step, start, ref, final, warmup, total):
    if step < warmup:
        return start + step / max(1, warmup) * (ref - start)
    progress = (step - warmup) / max(1, total - warmup)
    return max(final, final + (ref - final) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def ijepa_wd(step, ref, final, total):
    wd = final + (ref - final) * 0.5 * (1.0 + math.cos(math.pi * step / total))
    return max(final, wd) if final <= ref else min(final, wd)


def ijepa_momentum(step, m0, m1, total, scale):
    return m0 + step * (m1 - m0) / (total * scale)


@pytest.fixture
def cfg():
    c = optim.default_optim_config()
    c.warmup_steps = 40
    return c


@pytest.mark.parametrize("step", [0, 1, 20, 39, 40, 41, 100, 250, 399, 400])
def test_schedules_match_ijepa(cfg, step):
    total, batch = 400, 512  # batch 512 = a quarter of the reference 2048 -> lrs scaled by 1/4
    start, ref, final = (x * batch / 2048 for x in (cfg.start_lr, cfg.lr, cfg.final_lr))
    assert float(optim.lr_schedule(cfg, batch, total)(step)) == pytest.approx(
        ijepa_lr(step, start, ref, final, 40, total), rel=1e-5)
    assert float(optim.wd_schedule(cfg, total)(step)) == pytest.approx(ijepa_wd(step, 0.04, 0.4, total), rel=1e-5)
    for scale in (1.0, 1.25):
        cfg.ema_horizon = scale
        assert float(optim.ema_schedule(cfg, total)(step)) == pytest.approx(
            ijepa_momentum(step, 0.996, 1.0, total, scale), rel=1e-6)


def test_weight_decay_increases_and_momentum_reaches_one(cfg):
    wd = optim.wd_schedule(cfg, 100)
    assert float(wd(0)) == pytest.approx(0.04) and float(wd(100)) == pytest.approx(0.4)
    assert np.all(np.diff([float(wd(s)) for s in range(101)]) >= 0)
    assert float(optim.ema_schedule(cfg, 100)(100)) == pytest.approx(1.0)


def _toy_params():
    rng = np.random.default_rng(0)
    return {
        "encoder": {
            "cls_token": rng.normal(size=(1, 1, 8)).astype(np.float32),
            "patch_embed": {"proj": {"kernel": rng.normal(size=(4, 4, 3, 8)).astype(np.float32),
                                     "bias": rng.normal(size=(8,)).astype(np.float32)}},
            "norm": {"scale": rng.normal(size=(8,)).astype(np.float32),
                     "bias": rng.normal(size=(8,)).astype(np.float32)},
        },
        "predictor": {"predictor_proj": {"kernel": rng.normal(size=(8, 8)).astype(np.float32),
                                         "bias": rng.normal(size=(8,)).astype(np.float32)},
                      "mask_token": rng.normal(size=(1, 1, 8)).astype(np.float32)},
    }


def test_decay_mask_only_kernels():
    mask = optim.decay_mask(_toy_params())
    flat = {"/".join(p.key for p in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat == {
        "encoder/cls_token": False, "encoder/patch_embed/proj/kernel": True, "encoder/patch_embed/proj/bias": False,
        "encoder/norm/scale": False, "encoder/norm/bias": False, "predictor/predictor_proj/kernel": True,
        "predictor/predictor_proj/bias": False, "predictor/mask_token": False,
    }


def test_zero_gradient_step_decays_only_kernels_by_lr_times_wd(cfg):
    """torch AdamW semantics: with zero gradients the update is exactly -lr * wd * p on decayed leaves."""
    params = jax.tree.map(jnp.asarray, _toy_params())
    tx = optim.make_optimizer(cfg, batch_size=2048, total_steps=400)
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    lr, wd = float(optim.lr_schedule(cfg, 2048, 400)(0)), float(optim.wd_schedule(cfg, 400)(0))
    mask = optim.decay_mask(params)
    for u, p, m in zip(jax.tree.leaves(updates), jax.tree.leaves(params), jax.tree.leaves(mask)):
        expected = -lr * wd * np.asarray(p) if m else np.zeros_like(p)
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6, atol=1e-12)


def test_matches_torch_adamw_over_steps(cfg):
    """Five steps with random gradients and the same decay groups match torch.optim.AdamW, whose lr and
    weight decay we set per step from the same schedules (as I-JEPA's schedulers do)."""
    torch = pytest.importorskip("torch")
    total = 50
    params = jax.tree.map(jnp.asarray, _toy_params())
    leaves, treedef = jax.tree.flatten(params)
    decay = jax.tree.leaves(optim.decay_mask(params))
    tparams = [torch.nn.Parameter(torch.tensor(np.asarray(x), dtype=torch.float64)) for x in leaves]
    groups = [{"params": [p for p, d in zip(tparams, decay) if d]},
              {"params": [p for p, d in zip(tparams, decay) if not d], "weight_decay": 0.0}]
    topt = torch.optim.AdamW(groups, lr=1.0, betas=(cfg.b1, cfg.b2), eps=cfg.eps, weight_decay=0.0)
    tx = optim.make_optimizer(cfg, batch_size=2048, total_steps=total)
    state = tx.init(params)
    lr_fn, wd_fn = optim.lr_schedule(cfg, 2048, total), optim.wd_schedule(cfg, total)
    rng = np.random.default_rng(1)
    for step in range(5):
        grads = [rng.normal(size=x.shape).astype(np.float32) for x in leaves]
        updates, state = tx.update(jax.tree.unflatten(treedef, [jnp.asarray(g) for g in grads]), state, params)
        params = optax.apply_updates(params, updates)
        topt.param_groups[0].update(lr=float(lr_fn(step)), weight_decay=float(wd_fn(step)))
        topt.param_groups[1].update(lr=float(lr_fn(step)))
        for p, g in zip(tparams, grads):
            p.grad = torch.tensor(g, dtype=torch.float64)
        topt.step()
    for ours, theirs in zip(jax.tree.leaves(params), tparams):
        np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=2e-5, atol=1e-6)


def test_ema_update():
    t = {"a": jnp.ones((3,)), "b": jnp.zeros((2, 2))}
    o = {"a": jnp.zeros((3,)), "b": jnp.ones((2, 2))}
    out = optim.ema_update(t, o, 0.9)
    np.testing.assert_allclose(out["a"], 0.9)
    np.testing.assert_allclose(out["b"], 0.1, rtol=1e-6)
