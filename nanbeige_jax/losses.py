"""The loss core shared by every trainer (pre-training, SFT, DPD, RL): per-token log-probs, full-distribution KL,
masks and reductions.

Numerics: the output head runs as a chunked matmul over the vocabulary with fp32 accumulation
(``preferred_element_type=float32``), log-sum-exp is computed online across chunks in fp32, and each chunk's body is
rematerialised (``jax.checkpoint``) so neither the forward nor the backward pass ever holds a (B, T, V) array: the
largest temporary is (B, T, chunk), chunk <= vocab_chunk.

Chunk layout: n chunks of c columns, chunk i = vocab ids {i, i + n, i + 2n, ...} (a reshape (D, c, n) of the head,
moved to (n, D, c): one copy of the head, sharded like it). Strided chunks keep a head sharded over V ("tensor"
axis) local: every device computes its own columns of every chunk, and only (B, T) statistics are reduced across
devices. n is chosen as a divisor of V when one gives chunks at least half of vocab_chunk (166144 = 22 x 7552 for
Nanbeige4 at 8192); otherwise V is zero-padded to n * c and the padding columns are masked to -inf.

Normalisation: reductions return (sum, weight) pairs, never per-sequence or per-micro-batch means, so the trainer
divides once by the true token count (sum of weights) of the whole global batch; that keeps the loss and its gradient
invariant to gradient accumulation, data parallelism and packing.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -jnp.inf


def _chunking(vocab_size: int, vocab_chunk: int) -> tuple[int, int]:
  """(num_chunks, chunk_size) with num_chunks * chunk_size >= V and chunk_size <= vocab_chunk. Prefers a divisor
  of V (no padding, so a vocab-sharded head keeps its layout) unless that makes chunks less than half as big."""
  if isinstance(vocab_chunk, bool) or not isinstance(vocab_chunk, (int, np.integer)) or vocab_chunk <= 0:
    raise ValueError(f"vocab_chunk: expected a positive int, found {vocab_chunk!r}")
  min_chunks = -(-vocab_size // int(vocab_chunk))
  for num_chunks in range(min_chunks, 2 * min_chunks + 1):
    if vocab_size % num_chunks == 0:
      return num_chunks, vocab_size // num_chunks
  return min_chunks, -(-vocab_size // min_chunks)


def _strided_chunks(weight: jax.Array, num_chunks: int, chunk: int) -> jax.Array:
  """(D, V) -> (num_chunks, D, chunk) where chunk i holds vocab columns i, i + n, i + 2n, ... (n = num_chunks),
  zero-padded past V. Strided (not contiguous) chunks keep a head sharded over V local to its devices: each shard
  contributes its own columns to every chunk, so no device ever gathers the full head."""
  pad = num_chunks * chunk - weight.shape[1]
  if pad:
    weight = jnp.pad(weight, ((0, 0), (0, pad)))
  return jnp.moveaxis(weight.reshape(weight.shape[0], chunk, num_chunks), 2, 0)


def _chunk_logits(hidden: jax.Array, weight_chunk: jax.Array, index: jax.Array, num_chunks: int, vocab_size: int):
  """fp32 logits (..., chunk) of chunk ``index`` (vocab ids index + k * num_chunks) from hidden (..., D), padding
  columns at -inf. Returns (logits, valid)."""
  # One 2-D matmul over flattened tokens (chunked_kl's autodiff then gets plain matmuls; measured neutral on TPU).
  lead = hidden.shape[:-1]
  logits = jnp.dot(hidden.reshape(-1, hidden.shape[-1]), weight_chunk, preferred_element_type=jnp.float32)
  logits = logits.reshape(lead + (weight_chunk.shape[1],))
  valid = (jnp.arange(weight_chunk.shape[1]) * num_chunks + index) < vocab_size
  return jnp.where(valid, logits, _NEG_INF), valid


def _check_head(hidden: jax.Array, weight: jax.Array, name: str) -> None:
  if hidden.ndim != 3 or weight.ndim != 2 or hidden.shape[-1] != weight.shape[0]:
    raise ValueError(f"{name}: expected hidden (B, T, D) and head weight (D, V), found {hidden.shape} and "
                     f"{weight.shape}")


def token_logprobs(hidden: jax.Array, head_weight: jax.Array, targets: jax.Array, *, vocab_chunk: int = 8192,
                   return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """log p(targets) (B, T) in fp32 from hidden (B, T, D) (any dtype) and the head (D, V), chunked over V.

  With ``return_lse`` also returns the fp32 log-partition (B, T) (for z-loss). Targets outside [0, V) (e.g. an
  ignore id) give finite values (-logsumexp) that must be masked out by the caller's weights.

  The gradient is hand-written (``jax.custom_vjp``): per chunk, d logits = onehot * g_lp + p * (g_lse - g_lp) with
  p = exp(logits - lse), one fused elementwise pass, then the two matmuls into d hidden and d head. Autodiff of the
  online log-sum-exp instead differentiates through the running max and rescales and turns the target pick into a
  scatter: several more passes over every (tokens, chunk) tile. With several chunks the backward pass recomputes
  each chunk's logits (memory stays O(tokens x chunk)); with one chunk (``vocab_chunk >= V``) the forward pass
  keeps the logits for the backward pass (memory O(tokens x V), one matmul fewer: the fast setting for small
  vocabularies)."""
  _check_head(hidden, head_weight, "token_logprobs")
  if targets.shape != hidden.shape[:2]:
    raise ValueError(f"token_logprobs: targets {targets.shape} must match hidden's (B, T) = {hidden.shape[:2]}")
  num_chunks, chunk = _chunking(head_weight.shape[1], vocab_chunk)
  logprobs, lse = _logprobs_lse(hidden, head_weight, targets.astype(jnp.int32), num_chunks, chunk)
  return (logprobs, lse) if return_lse else logprobs


def _target_mask(targets: jax.Array, index, num_chunks: int, chunk: int, vocab_size: int) -> jax.Array:
  """(N, chunk) bool: column j of chunk ``index`` (vocab id index + j * num_chunks) is the token's target."""
  vocab_ids = jnp.arange(chunk, dtype=jnp.int32) * num_chunks + index
  return (vocab_ids[None, :] == targets[:, None]) & (targets[:, None] < vocab_size)


def _logprobs_lse_fwd_impl(hidden, head_weight, targets, num_chunks, chunk):
  """Forward over flattened tokens. Returns ((logprobs, lse) as (B, T), logits of the single chunk or None)."""
  b, t, d = hidden.shape
  vocab_size = head_weight.shape[1]
  h2, y = hidden.reshape(b * t, d), targets.reshape(b * t)

  def chunk_stats(index, weight_chunk):
    logits, _ = _chunk_logits(h2, weight_chunk, index, num_chunks, vocab_size)
    target_logit = jnp.sum(jnp.where(_target_mask(y, index, num_chunks, chunk, vocab_size), logits, 0.0), axis=-1)
    return logits, logits.max(axis=-1), target_logit

  if num_chunks == 1:
    logits, m, target_logit = chunk_stats(0, head_weight)  # one chunk: chunk == V (1 divides every V)
    lse = m + jnp.log(jnp.exp(logits - m[:, None]).sum(axis=-1))
    saved = logits
  else:
    def body(carry, xs):
      running_max, sum_exp, target_logit = carry
      logits, m, picked = chunk_stats(*xs)
      new_max = jnp.maximum(running_max, m)
      sum_exp = sum_exp * jnp.exp(running_max - new_max) + jnp.exp(logits - new_max[:, None]).sum(axis=-1)
      return (new_max, sum_exp, target_logit + picked), None

    n = b * t
    init = (jnp.full((n,), _NEG_INF, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    xs = (jnp.arange(num_chunks), _strided_chunks(head_weight, num_chunks, chunk))
    (running_max, sum_exp, target_logit), _ = jax.lax.scan(body, init, xs)
    lse = running_max + jnp.log(sum_exp)
    saved = None
  return ((target_logit - lse).reshape(b, t), lse.reshape(b, t)), saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _logprobs_lse(hidden, head_weight, targets, num_chunks, chunk):
  return _logprobs_lse_fwd_impl(hidden, head_weight, targets, num_chunks, chunk)[0]


def _logprobs_lse_fwd(hidden, head_weight, targets, num_chunks, chunk):
  out, saved = _logprobs_lse_fwd_impl(hidden, head_weight, targets, num_chunks, chunk)
  return out, (hidden, head_weight, targets, out[1], saved)


def _logprobs_lse_bwd(num_chunks, chunk, residuals, cotangents):
  hidden, head_weight, targets, lse, saved = residuals
  g_lp, g_lse = cotangents
  b, t, d = hidden.shape
  vocab_size = head_weight.shape[1]
  h2, y = hidden.reshape(b * t, d), targets.reshape(b * t)
  lse, g_lp, g_lse = lse.reshape(-1, 1), g_lp.reshape(-1, 1).astype(jnp.float32), g_lse.reshape(-1, 1).astype(
      jnp.float32)

  def chunk_grads(index, weight_chunk, logits):
    """(d hidden contribution (N, D) fp32, d weight chunk (D, chunk))."""
    p = jnp.exp(logits - lse)  # padding columns hold -inf: p = 0 there
    onehot = _target_mask(y, index, num_chunks, chunk, vocab_size)
    dlogits = (jnp.where(onehot, g_lp, 0.0) + p * (g_lse - g_lp)).astype(hidden.dtype)
    dh = jnp.dot(dlogits, weight_chunk.T, preferred_element_type=jnp.float32)
    dw = jnp.dot(h2.T, dlogits, preferred_element_type=jnp.float32).astype(head_weight.dtype)
    return dh, dw

  if num_chunks == 1:
    dh, dw = chunk_grads(0, head_weight, saved)
  else:
    def body(dh, xs):
      index, weight_chunk = xs
      logits, _ = _chunk_logits(h2, weight_chunk, index, num_chunks, vocab_size)
      dh_c, dw_c = chunk_grads(index, weight_chunk, logits)
      return dh + dh_c, dw_c

    xs = (jnp.arange(num_chunks), _strided_chunks(head_weight, num_chunks, chunk))
    dh, dw_chunks = jax.lax.scan(body, jnp.zeros((b * t, d), jnp.float32), xs)
    dw = _unstride_chunks(dw_chunks, vocab_size)
  return dh.reshape(b, t, d).astype(hidden.dtype), dw, None


_logprobs_lse.defvjp(_logprobs_lse_fwd, _logprobs_lse_bwd)


def _unstride_chunks(chunks: jax.Array, vocab_size: int) -> jax.Array:
  """Inverse of ``_strided_chunks``: (num_chunks, D, chunk) -> (D, V)."""
  num_chunks, d, chunk = chunks.shape
  return jnp.moveaxis(chunks, 0, 2).reshape(d, chunk * num_chunks)[:, :vocab_size]


def chunked_kl(student_hidden: jax.Array, student_w: jax.Array, teacher_hidden: jax.Array, teacher_w: jax.Array, *,
               vocab_chunk: int = 8192, temperature: float = 1.0) -> jax.Array:
  """Per-token KL(teacher || student) (B, T) fp32 over the full vocabulary at ``temperature`` (both logits divided
  by it; no T^2 factor), chunked over V in one pass with online log-sum-exp for both distributions:

    KL = sum_v p_t(v) (a_v - b_v) - lse(a) + lse(b),   a = teacher logits / T, b = student logits / T.

  Gradients flow to every input; stop the teacher's with ``jax.lax.stop_gradient`` at the call site."""
  _check_head(student_hidden, student_w, "chunked_kl (student)")
  _check_head(teacher_hidden, teacher_w, "chunked_kl (teacher)")
  if student_hidden.shape[:2] != teacher_hidden.shape[:2] or student_w.shape[1] != teacher_w.shape[1]:
    raise ValueError(f"chunked_kl: student/teacher disagree on (B, T) or V: hidden {student_hidden.shape} vs "
                     f"{teacher_hidden.shape}, head {student_w.shape} vs {teacher_w.shape}")
  if not temperature > 0:
    raise ValueError(f"chunked_kl: temperature must be > 0, found {temperature!r}")
  vocab_size = student_w.shape[1]
  num_chunks, chunk = _chunking(vocab_size, vocab_chunk)
  inv_temp = np.float32(1.0 / temperature)

  @jax.checkpoint
  def body(carry, xs):
    t_max, t_sum, cross, s_max, s_sum = carry
    index, t_weight, s_weight = xs
    t_logits, valid = _chunk_logits(teacher_hidden, t_weight, index, num_chunks, vocab_size)
    s_logits, _ = _chunk_logits(student_hidden, s_weight, index, num_chunks, vocab_size)
    t_logits, s_logits = t_logits * inv_temp, s_logits * inv_temp
    new_t_max = jax.lax.stop_gradient(jnp.maximum(t_max, t_logits.max(axis=-1)))
    new_s_max = jax.lax.stop_gradient(jnp.maximum(s_max, s_logits.max(axis=-1)))
    t_rescale = jnp.exp(t_max - new_t_max)
    t_exp = jnp.exp(t_logits - new_t_max[..., None])
    # Padding columns hold -inf in both: take the difference on finite stand-ins so no nan reaches the gradient.
    diff = jnp.where(valid, t_logits, 0.0) - jnp.where(valid, s_logits, 0.0)
    cross = cross * t_rescale + (t_exp * diff).sum(axis=-1)
    t_sum = t_sum * t_rescale + t_exp.sum(axis=-1)
    s_sum = s_sum * jnp.exp(s_max - new_s_max) + jnp.exp(s_logits - new_s_max[..., None]).sum(axis=-1)
    return (new_t_max, t_sum, cross, new_s_max, s_sum), None

  shape = student_hidden.shape[:2]
  neg, zero = jnp.full(shape, _NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32)
  xs = (jnp.arange(num_chunks), _strided_chunks(teacher_w, num_chunks, chunk),
        _strided_chunks(student_w, num_chunks, chunk))
  (t_max, t_sum, cross, s_max, s_sum), _ = jax.lax.scan(body, (neg, zero, zero, neg, zero), xs)
  return cross / t_sum - (t_max + jnp.log(t_sum)) + (s_max + jnp.log(s_sum))


def logprobs_from_logits(logits: jax.Array, targets: jax.Array, *, return_lse: bool = False
                         ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """log p(targets) (B, T) fp32 from materialised logits (B, T, V) (small models, tests, evaluation)."""
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f"logprobs_from_logits: logits {logits.shape} and targets {targets.shape} disagree on (B, T)")
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  vocab_size = logits.shape[-1]
  targets = targets.astype(jnp.int32)
  picked = jnp.take_along_axis(logits, jnp.clip(targets, 0, vocab_size - 1)[..., None], axis=-1)[..., 0]
  logprobs = jnp.where((targets >= 0) & (targets < vocab_size), picked, 0.0) - lse
  return (logprobs, lse) if return_lse else logprobs


def masked_sum(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(values * weights) in fp32; positions with weight 0 contribute exactly 0 even if their value is inf/nan."""
  values = values.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  return jnp.sum(jnp.where(weights != 0, values * weights, 0.0))


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """masked_sum / sum(weights); 0 when all weights are 0. Local only: for training losses use the (sum, weight)
  pairs and divide by the global weight."""
  total = jnp.sum(weights.astype(jnp.float32))
  return jnp.where(total > 0, masked_sum(values, weights) / jnp.where(total > 0, total, 1.0), 0.0)


def cross_entropy(hidden: jax.Array, head_weight: jax.Array, targets: jax.Array, weights: jax.Array, *,
                  z_loss_weight: float = 0.0, vocab_chunk: int = 8192) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
  """Weighted next-token cross-entropy as a (loss_sum, weight_sum, aux) triple.

  loss_sum = sum_t w_t * (-log p(target_t)) + z_loss_weight * sum_t w_t * lse_t^2, weight_sum = sum_t w_t. The
  trainer divides the sum of loss_sum over micro-batches and devices by the sum of weight_sum (the true token count).
  aux: per-token ``nll`` and ``lse`` (B, T) fp32 (for per-source reporting with ``per_group_sums``), and the two
  summed terms ``nll_sum`` and ``z_loss_sum``."""
  if weights.shape != targets.shape:
    raise ValueError(f"cross_entropy: weights {weights.shape} must match targets {targets.shape}")
  logprobs, lse = token_logprobs(hidden, head_weight, targets, vocab_chunk=vocab_chunk, return_lse=True)
  nll = -logprobs
  nll_sum = masked_sum(nll, weights)
  z_loss_sum = masked_sum(jnp.square(lse), weights) * z_loss_weight if z_loss_weight else jnp.zeros((), jnp.float32)
  weight_sum = jnp.sum(weights.astype(jnp.float32))
  aux = {"nll": nll, "lse": lse, "nll_sum": nll_sum, "z_loss_sum": z_loss_sum}
  return nll_sum + z_loss_sum, weight_sum, aux


def per_group_sums(values: jax.Array, weights: jax.Array, group_ids: jax.Array, num_groups: int
                   ) -> tuple[jax.Array, jax.Array]:
  """Per-group (sum of w * value, sum of w), each (num_groups,) fp32, e.g. the loss per data source. Tokens whose
  group id is outside [0, num_groups) are dropped."""
  if not (values.shape == weights.shape == group_ids.shape):
    raise ValueError(f"per_group_sums: values {values.shape}, weights {weights.shape} and group_ids "
                     f"{group_ids.shape} must have the same shape")
  weights = weights.astype(jnp.float32)
  group_ids = group_ids.astype(jnp.int32).reshape(-1)
  in_range = (group_ids >= 0) & (group_ids < num_groups)
  weights = jnp.where(in_range, weights.reshape(-1), 0.0)
  contrib = jnp.where(weights != 0, values.astype(jnp.float32).reshape(-1) * weights, 0.0)
  ids = jnp.where(in_range, group_ids, 0)
  sums = jax.ops.segment_sum(contrib, ids, num_segments=num_groups)
  counts = jax.ops.segment_sum(weights, ids, num_segments=num_groups)
  return sums, counts
