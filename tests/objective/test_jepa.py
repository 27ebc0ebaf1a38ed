"""The assembled JEPA step: CLS reassignment semantics, compile-once, EMA inside the step, and learning
on real faces."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers.faces import load_faces
from helpers.tiny_configs import tiny_config
from mefem_jax.training.train_step import build, init_state, make_train_step



def utkface_batch(utkface_dir: Path, n: int, size: int, offset: int = 0) -> np.ndarray:
    """n faces from the sorted file list (sorted by age, so `offset` picks an age range), normalised."""
    files = sorted((utkface_dir / "images").glob("*.jpg"))[offset:offset + n]
    return load_faces(files, size, Image.BILINEAR)


@pytest.fixture(scope="module")
def face_batch(faces):
    return faces(8, 112)  # 8 real test-split faces, ImageNet-normalised (conftest)


def test_cls_reassignment_controls_gradient_to_context_cls(face_batch):
    """When every sample's CLS is a target, the context encoder never lets anyone attend to its CLS token, so the
    loss has exactly zero gradient w.r.t. it; when CLS always stays in the context, the gradient is non-zero.
    The CLS loss only exists in the first case."""
    for p_cls, expect_grad in ((1.0, False), (0.0, True)):
        pieces = build(tiny_config(**{"loss.cls.p_target": p_cls, "total_steps": 100}))
        state = init_state(pieces, jax.random.PRNGKey(0))
        obj = pieces.objective
        grad_fn = jax.jit(jax.grad(lambda p: obj.loss(p, state.target_params, face_batch, jax.random.PRNGKey(3)),
                                   has_aux=True))
        grads, metrics = grad_fn(state.params)
        g_cls = np.abs(np.asarray(grads["encoder"]["cls_token"])).max()
        assert (g_cls > 0) == expect_grad, (p_cls, g_cls)
        assert float(metrics["cls_target_frac"]) == p_cls
        assert (float(metrics["loss_cls"]) > 0) == (p_cls == 1.0)
        # The CLS query token only learns when it has a target.
        g_q = np.abs(np.asarray(grads["predictor"]["cls_query"])).max()
        assert (g_q > 0) == (not expect_grad), (p_cls, g_q)


# Stripes (padded slots) and multiblock (padded context, reclaimed targets) exercise every mask path of
# the step; the quadrant sampler's own compile-once check is in test_masking.py.
@pytest.mark.parametrize("strategy", ["stripes", "multiblock"])
def test_step_compiles_once_over_50_steps_and_updates_ema(strategy, face_batch):
    pieces = build(tiny_config(**{"mask.strategy": strategy, "total_steps": 50}))
    traces = []
    raw_step = make_train_step(pieces)

    def counted(state, images):
        traces.append(1)  # runs only while jax traces the function, i.e. once per compilation
        return raw_step(state, images)

    step = jax.jit(counted, donate_argnums=0)
    state = init_state(pieces, jax.random.PRNGKey(0))
    images = jnp.asarray(face_batch)
    prev_target = prev_params = None
    for i in range(50):
        if i == 49:
            prev_target = jax.tree.map(np.asarray, state.target_params)
        state, metrics = step(state, images)
        if i == 49:
            prev_params = state.params["encoder"]
    assert len(traces) == 1, f"train step retraced {len(traces)} times"
    assert step._cache_size() == 1
    assert int(state.step) == 50
    # The last update moved the target towards the new online params with the scheduled momentum.
    m = float(metrics["ema_momentum"])
    assert m == pytest.approx(0.996 + 0.004 * 49 / 50, rel=1e-6)
    expected = jax.tree.map(lambda t, o: m * t + (1 - m) * np.asarray(o), prev_target, prev_params)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state.target_params)):
        np.testing.assert_allclose(np.asarray(b), a, rtol=1e-5, atol=1e-7)


def test_masks_differ_between_steps():
    """Fresh masks every step come from fold_in(rng, step), not from a fixed draw."""
    pieces = build(tiny_config(total_steps=100))
    obj = pieces.objective
    a, _ = obj.sample(jax.random.fold_in(jax.random.PRNGKey(0), 0), 8)
    b, _ = obj.sample(jax.random.fold_in(jax.random.PRNGKey(0), 1), 8)
    assert not np.array_equal(np.asarray(a.ctx_idx), np.asarray(b.ctx_idx))


def test_learns_on_real_faces_without_collapse(utkface_dir):
    """~100 steps of the smoke model on 256 UTKFace faces: the loss falls well below its start and the target
    encoder keeps distinguishing faces.

    Collapse threshold: `target_std` is the batch std of mean-pooled, per-token layer-normed target features,
    averaged over channels. At init it is ~0.1-0.3 on faces; a collapsed encoder (one output for every image)
    gives exactly 0 and a near-collapsed one < 1e-3. We require it to stay above 0.02 and above a fifth of its
    starting value, so a slow slide towards collapse also fails.
    """
    c = tiny_config(total_steps=120)
    c.model.update(width=96, depth=3, heads=3)
    c.predictor.update(width=48, depth=2, heads=3)
    c.data.batch_size = c.optim.ref_batch = 32
    c.optim.update(lr=2e-3, warmup_steps=10)
    pool = utkface_batch(utkface_dir, 256, 112, offset=2000)
    pieces = build(c)
    state = init_state(pieces, jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(pieces), donate_argnums=0)
    rng = np.random.default_rng(0)
    history = []
    for _ in range(c.total_steps):
        idx = rng.choice(len(pool), 32, replace=False)
        batch = pool[idx]
        batch = np.where(rng.random((32, 1, 1, 1)) < 0.5, batch[:, :, ::-1], batch)  # flip augmentation
        state, metrics = step(state, jnp.asarray(batch))
        history.append(jax.device_get(metrics))
    first = np.mean([h["loss"] for h in history[:10]])
    last = np.mean([h["loss"] for h in history[-10:]])
    std0, std1 = history[0]["target_std"], history[-1]["target_std"]
    assert last < 0.6 * first, f"loss did not fall enough: {first:.4f} -> {last:.4f}"
    assert std1 > 0.02 and std1 > 0.2 * std0, f"target features collapsed: std {std0:.4f} -> {std1:.4f}"


def test_sigreg_term_is_added_only_when_asked(face_batch):
    """Weight 0 (MeFEm's recipe) leaves the loss exactly the JEPA loss and the masks unchanged; a weight
    adds weight * sigreg, and its gradient reaches the context encoder's CLS even when CLS is a target."""
    base = tiny_config(**{"loss.cls.p_target": 1.0, "total_steps": 100})
    reg = tiny_config(**{"loss.cls.p_target": 1.0, "total_steps": 100})
    reg.loss.sigreg.weight = 0.5
    out = {}
    for name, c in (("base", base), ("reg", reg)):
        pieces = build(c)
        state = init_state(pieces, jax.random.PRNGKey(0))
        obj = pieces.objective
        out[name] = jax.jit(jax.value_and_grad(
            lambda p: obj.loss(p, state.target_params, face_batch, jax.random.PRNGKey(3)), has_aux=True))(state.params)
    (loss0, m0), g0 = out["base"]
    (loss1, m1), g1 = out["reg"]
    assert float(m0["sigreg"]) == 0.0 and float(loss0) == float(m0["loss_jepa"])
    assert float(m1["loss_jepa"]) == float(m0["loss_jepa"])  # same masks, same JEPA term
    assert float(m1["sigreg"]) > 0
    assert float(loss1) == pytest.approx(float(m1["loss_jepa"]) + 0.5 * float(m1["sigreg"]), rel=1e-6)
    assert np.abs(np.asarray(g0["encoder"]["cls_token"])).max() == 0.0
    assert np.abs(np.asarray(g1["encoder"]["cls_token"])).max() > 0.0
