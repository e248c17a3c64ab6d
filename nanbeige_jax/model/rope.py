"""Rotary position embeddings in the Hugging Face "rotate-half" convention."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  """positions (B, T) int -> cos, sin of shape (B, T, head_dim), fp32.

  ``theta`` may be a traced scalar, so a RoPE base change (ABF) does not recompile the step.
  """
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (jnp.asarray(theta, jnp.float32) ** exponent)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, head_dim/2)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, T, N, D); cos/sin (B, T, D). Computed in fp32, returned in x's dtype."""
  xf = x.astype(jnp.float32)
  out = xf * cos[:, :, None, :] + rotate_half(xf) * sin[:, :, None, :]
  return out.astype(x.dtype)
