"""The language-modelling loss on the shared loss core: next-token cross-entropy over weighted tokens, plus
per-source sums for per-domain loss reporting. Used by pre-training and SFT (whose weights are the assistant
mask) alike."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nanbeige_jax import losses


def make_lm_loss(*, num_sources: int = 0, z_loss_weight: float = 0.0, vocab_chunk: int = 8192):
  """loss_fn(model, batch, rope_theta) -> (loss_sum, token_count, sums) for ``nanbeige_jax.train.loop.Trainer``.

  batch: inputs, targets, positions, segment_ids (int32 (B,T)), loss_weights (float32 (B,T)) and, when
  ``num_sources`` > 0, source_ids (int32 (B,T), -1 on padding).
  """
  def loss_fn(model, batch, rope_theta):
    hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"], rope_theta=rope_theta,
                   return_hidden=True)
    weights = batch["loss_weights"].astype(jnp.float32)
    loss_sum, weight_sum, aux = losses.cross_entropy(
        hidden, model.head_weight(), batch["targets"], weights, z_loss_weight=z_loss_weight,
        vocab_chunk=vocab_chunk)
    sums = {"nll_sum": jnp.sum(aux["nll"] * weights)}
    if num_sources:
      src_nll, src_tokens = losses.per_group_sums(aux["nll"], weights, batch["source_ids"], num_sources)
      sums["source_nll"], sums["source_tokens"] = src_nll, src_tokens
    return loss_sum, weight_sum, sums
  return loss_fn
