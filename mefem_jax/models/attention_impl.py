"""Which kernel computes attention: `model.attention` = "xla" | "cudnn" | "auto".

"xla" is the call the models have always made, `jax.nn.dot_product_attention(q, k, v, mask=mask)`: XLA's
unfused path, the same on every backend, and the default, so existing runs and checkpoints compute what
they did. "cudnn" asks for cuDNN's fused (flash) attention; "auto" takes it where it can run and is "xla"
everywhere else (CPU, TPU, float32, unsupported head dims), so on those it is today's call exactly.

cuDNN's limits, as jax 0.10.2 checks them (jax/_src/cudnn/fused_attention_stablehlo.py): a CUDA GPU,
bfloat16 or float16 q/k/v, a head dim that is a multiple of 8 and at most 128 (256 from compute
capability 9.0, Hopper), and with a mask (which cuDNN takes as an additive bias) even query and key
lengths when the backward pass runs. The mask must also be [B, 1, T, S]: our key masks are [B, 1, 1, S],
so the cuDNN path broadcasts them (the valid keys are not always first, so `key_value_seq_lengths` cannot
stand in: a hidden CLS is key 0).

Odd masked lengths are common here (ViT-B/16's predictor attends over 243 tokens with the default
stripes), so the cuDNN path pads them (`pad_to_even_lengths`): one more key, masked out, and one more
query, whose output row is dropped. No real token sees the extra key and nothing flows back from the extra
row, so outputs and gradients are those of the unpadded call.

What can be known from the config (backend, dtype, head dims) is checked by `check_attention` at
`config.validate_config` and at model build, before anything is traced. The lengths are known only at
trace time: `resolve` then picks the kernel once per compiled shape, never per step, from the traced
dtype and head dim.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.extend
import jax.numpy as jnp

CHOICES = ("auto", "xla", "cudnn")
DEFAULT = "xla"  # keeps the outputs of every existing run; "auto" is the one to try on a GPU
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class AttentionImplError(ValueError):
    """model.attention asks for a kernel that cannot run here; one line with the reason and the way out."""


def _refuse(reason: str) -> AttentionImplError:
    return AttentionImplError(f"model.attention='cudnn' cannot run: {reason}; use model.attention=auto "
                              "(cuDNN where it can run, else XLA) or model.attention=xla")


def _platform() -> tuple[str, str, tuple[int, int] | None]:
    """(backend, its platform version, the first GPU's compute capability or None) of this process."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend, "", None
    version = jax.extend.backend.get_backend().platform_version.lower()
    capability = getattr(jax.devices()[0], "compute_capability", None)
    major_minor = tuple(int(x) for x in capability.split(".")[:2]) if capability else None
    return backend, version, major_minor


def cudnn_refusal(dtype: Any, head_dim: int, platform: tuple[str, str, tuple[int, int] | None] | None = None
                  ) -> str | None:
    """Why cuDNN flash attention cannot run for this compute dtype and head dim, or None when it can.

    `platform` is `(backend, platform version, compute capability)`, this process's by default.
    """
    backend, version, capability = _platform() if platform is None else platform
    if backend != "gpu" or "cuda" not in version:
        return f"the {backend} backend has no cuDNN (it needs a CUDA GPU)"
    if jnp.dtype(dtype) not in _HALF:
        return f"cuDNN attention needs bfloat16 or float16 compute, model.dtype is {jnp.dtype(dtype).name}"
    limit = 256 if capability is not None and capability >= (9, 0) else 128
    if head_dim % 8 or head_dim > limit:
        return f"cuDNN attention needs a head dim that is a multiple of 8 and at most {limit}, got {head_dim}"
    return None


def check_attention(requested: str, dtype: Any, head_dims: tuple[int, ...],
                    platform: tuple[str, str, tuple[int, int] | None] | None = None) -> None:
    """Raises AttentionImplError for an unknown value, or for "cudnn" where it cannot run for a head dim."""
    if requested not in CHOICES:
        raise AttentionImplError(f"model.attention={requested!r} is not allowed; allowed: one of {list(CHOICES)}")
    if requested == "cudnn":
        for head_dim in head_dims:
            if (reason := cudnn_refusal(dtype, head_dim, platform)) is not None:
                raise _refuse(reason)


def resolve(requested: str, dtype: Any, head_dim: int,
            platform: tuple[str, str, tuple[int, int] | None] | None = None) -> str:
    """"xla" or "cudnn" for one attention call's compute dtype and head dim; "auto" never fails, "cudnn" may.

    Lengths do not decide: the cuDNN path pads odd masked lengths itself (`pad_to_even_lengths`)."""
    if requested == "xla":
        return "xla"
    reason = cudnn_refusal(dtype, head_dim, platform)
    if reason is None:
        return "cudnn"
    if requested == "auto":
        return "xla"
    raise _refuse(reason)


def pad_to_even_lengths(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
                        ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """q/k/v `[B, T|S, N, H]` and key mask `[B, 1, 1, S]` with an odd T or S made even by one zero slot.

    The extra key is masked out. The extra query attends to the real keys like any other (so its row is
    never all-masked, which would be NaN) and the caller drops its output: `out[:, :T]`."""
    def pad(x: jax.Array, n: int) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))

    extra_q, extra_k = q.shape[1] % 2, k.shape[1] % 2
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, extra_k)), constant_values=False)
    return pad(q, extra_q), pad(k, extra_k), pad(v, extra_k), mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          requested: str) -> jax.Array:
    """Softmax attention, q/k/v `[B, T|S, N, H]`, mask bool `[B, 1, 1, S]` or None, by `requested`'s kernel."""
    b, t, _, head_dim = q.shape
    if resolve(requested, q.dtype, head_dim) == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask)  # the models' call before the knob existed
    if mask is None:  # no mask, no length limit
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    q, k, v, mask = pad_to_even_lengths(q, k, v, mask)
    mask = jnp.broadcast_to(mask, (b, 1, q.shape[1], k.shape[1]))  # cuDNN takes no mask broadcast over queries
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")[:, :t]
