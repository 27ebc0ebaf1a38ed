"""The PyTorch reference step (mefem_jax/reference/torch_step.py) computes exactly what the JAX step computes.

This is what makes the throughput comparison in benchmarks/train_step.py a comparison of two
implementations of ONE algorithm: started from the same parameters and fed the same faces, masks and CLS
coins, both give the same loss, the same gradients and the same parameters after one AdamW + EMA update.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from helpers.tiny_configs import tiny_config  # noqa: E402
from mefem_jax.reference import torch_step as ref  # noqa: E402
from mefem_jax.training import optim  # noqa: E402
from mefem_jax.training.train_step import build, init_state, make_train_step  # noqa: E402
from mefem_jax.weights.timm_keys import params_to_timm  # noqa: E402

B = 8


def to_numpy(sd):
    return {k: v.detach().numpy().copy() for k, v in sd.items()}  # copy: the optimizer updates in place


def assert_trees_close(got: dict, want: dict, rtol: float, what: str):
    """Every tensor within rtol of the largest |value| of its JAX counterpart (robust to near-zero entries)."""
    assert set(got) == set(want), (what, set(got) ^ set(want))
    for key, w in want.items():
        scale = max(float(np.abs(w).max()), 1e-12)
        err = float(np.abs(got[key] - w).max())
        assert err <= rtol * scale, f"{what} {key}: max |diff| {err:.3g} vs max |value| {scale:.3g}"


def assert_updates_close(new: dict, want_new: dict, old: dict, tol: float, what: str):
    """new - old (torch's update) equals want_new - old (JAX's update) to within `tol`, leaf by leaf."""
    assert set(new) == set(want_new), (what, set(new) ^ set(want_new))
    for key in want_new:
        err = float(np.abs((new[key] - old[key]) - (want_new[key] - old[key])).max())
        assert err <= tol, f"{what} {key}: updates differ by {err:.3g} (tolerance {tol:.3g})"


# multiblock with two context sets and four target sets exercises every pairing and ordering the
# reference implements (I-JEPA's set-major concat and repeat_interleave_batch); stripes is the same code
# with one set each, so it runs only in the slow suite (each case compiles the JAX step, ~8-15 s on CPU).
@pytest.mark.parametrize("strategy", ["multiblock", pytest.param("stripes", marks=pytest.mark.slow)])
def test_reference_matches_jax_step(strategy, faces):
    c = tiny_config(**{"mask.strategy": strategy, "loss.cls.p_target": 0.5, "total_steps": 100})
    c.data.batch_size = c.optim.ref_batch = B
    c.mask.multiblock.n_enc = 2
    # Weight decay at step 0 is wd; 0.4 (I-JEPA's final value) makes its share of the first update
    # (lr * wd * |p|, up to ~1e-5 on LayerNorm scales, ~3e-6 on weights) far above the tolerance below.
    c.optim.wd = 0.4
    # Adam's eps from 1e-8 to 1e-6: an element whose gradient is ~eps gets an update of
    # ~lr * dg / (4 eps) from float32 gradient noise dg (~1e-10 here), which at eps 1e-8 is ~1% of lr and
    # would force a tolerance too loose to see weight decay. The update rule is the same either way.
    c.optim.eps = 1e-6
    pieces = build(c)
    state = jax.jit(functools.partial(init_state, pieces))(jax.random.PRNGKey(0))
    images = faces(B, c.model.image_size)

    # The masks the JAX step will draw at step 0, taken out on the host for the reference.
    masks, cls_target = jax.jit(pieces.objective.sample, static_argnums=1)(
        jax.random.fold_in(state.rng, state.step), B)
    masks = jax.tree.map(np.asarray, masks)
    cls_target = np.asarray(cls_target)
    assert 0 < cls_target.sum() < B, "both CLS branches must be exercised; pick another seed"

    model = ref.TorchMeFEm(c).train()
    tm = model.make_masks(masks, cls_target)  # with the reference's own circular weight grid
    model.load_jax(state.params, state.target_params)
    old = {name: to_numpy(m.state_dict()) for name, m in
           (("encoder", model.encoder), ("target", model.target), ("predictor", model.predictor))}
    images_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    with jax.default_matmul_precision("highest"):
        new_state, metrics = jax.jit(make_train_step(pieces))(state, jnp.asarray(images))
    torch_loss = float(model.step(images_t, tm))
    assert torch_loss == pytest.approx(float(metrics["loss"]), rel=1e-5)

    # Gradients: AdamW's first moment after one step is (1 - b1) * grad on both sides.
    mu = new_state.opt_state[0].mu
    jax_grads = {k: v / (1 - c.optim.b1) for k, v in params_to_timm(mu["encoder"], c.model).items()
                 if k != "pos_embed"}  # pos_embed: the fixed table, not trained on either side
    jax_grads.update({"pred." + k: v / (1 - c.optim.b1) for k, v in ref.predictor_state_dict(mu["predictor"]).items()})
    torch_grads = {k: p.grad.numpy() for k, p in model.encoder.named_parameters() if p.requires_grad}
    torch_grads.update({"pred." + k: p.grad.numpy() for k, p in model.predictor.named_parameters()})
    assert_trees_close(torch_grads, jax_grads, 1e-4, "gradient")
    assert np.abs(jax_grads["cls_token"]).max() > 0  # some samples kept CLS as context

    # One AdamW step (same lr, weight decay and decay groups), then one EMA step. Adam's first update is
    # ~lr * sign(grad) per element, so parameters are compared through their updates, to 1e-3 of lr:
    # a flipped sign, a wrong lr, decay on the wrong group or a missing EMA all miss it by far; what
    # remains is Adam normalising float32 gradient noise where |grad| ~ eps (see c.optim.eps above).
    lr = float(metrics["lr"])
    assert lr == pytest.approx(ref.lr_at(c.optim, B, c.total_steps, 0), rel=1e-6)
    want = {"encoder": params_to_timm(new_state.params["encoder"], c.model),
            "target": params_to_timm(new_state.target_params, c.model),
            "predictor": ref.predictor_state_dict(new_state.params["predictor"])}
    for name, m in (("encoder", model.encoder), ("target", model.target), ("predictor", model.predictor)):
        got = to_numpy(m.state_dict())
        assert_updates_close(got, want[name], old[name], 1e-3 * lr, name)
        assert_trees_close(got, want[name], 1e-4, name)
    # The update is real: about lr on the online encoder, (1 - momentum) of that on the target.
    moved = {name: max(float(np.abs(want[name][k] - old[name][k]).max()) for k in want[name]) for name in want}
    assert moved["encoder"] > 0.5 * lr and moved["predictor"] > 0.5 * lr
    assert 0 < moved["target"] < 0.1 * lr


def test_host_schedules_match_optax():
    """The reference sets lr / weight decay / EMA momentum on the host each step, from the same curves
    (to float32 rounding: optax evaluates them in float32, the host in float64)."""
    c = tiny_config(total_steps=100)
    oc, batch = c.optim, 24  # a batch != ref_batch exercises the linear lr scaling
    lr, wd, ema = optim.lr_schedule(oc, batch, 100), optim.wd_schedule(oc, 100), optim.ema_schedule(oc, 100)
    for step in (0, 7, oc.warmup_steps, 61, 99, 150):
        assert ref.lr_at(oc, batch, 100, step) == pytest.approx(float(lr(step)), rel=1e-5)
        assert ref.wd_at(oc, 100, step) == pytest.approx(float(wd(step)), rel=1e-5)
        assert ref.ema_at(oc, 100, step) == pytest.approx(float(ema(step)), rel=1e-5)
