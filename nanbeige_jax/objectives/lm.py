"""The language-modelling objective (pre-training, and SFT whose loss weights are the assistant mask): next-token
cross-entropy ``ce`` over weighted tokens and, when ``z_loss_weight`` > 0, the z-loss ``z`` (``lse^2``), each a term
divided by the global token count; per-source sums for per-domain loss reporting."""
from __future__ import annotations

import jax.numpy as jnp

from nanbeige_jax import losses
from nanbeige_jax.objectives.base import Objective


def make_lm_loss(*, num_sources: int = 0, z_loss_weight: float = 0.0, vocab_chunk: int = 8192) -> Objective:
  """The LM ``Objective``: terms ``ce`` (coefficient 1) and ``z`` (coefficient ``z_loss_weight``, only when > 0).

  batch: inputs, targets, positions, segment_ids (int32 (B,T)), loss_weights (float32 (B,T)) and, when
  ``num_sources`` > 0, source_ids (int32 (B,T), -1 on padding).
  """
  def fn(model, batch, rope_theta, frozen):
    del frozen
    hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"], rope_theta=rope_theta,
                   return_hidden=True)
    weights = batch["loss_weights"].astype(jnp.float32)
    _, weight_sum, aux = losses.cross_entropy(hidden, model.head_weight(), batch["targets"], weights,
                                              vocab_chunk=vocab_chunk)
    terms = {"ce": (aux["nll_sum"], weight_sum)}
    if z_loss_weight:
      terms["z"] = (losses.masked_sum(jnp.square(aux["lse"]), weights), weight_sum)
    sums = {}
    if num_sources:
      sums["source_nll"], sums["source_tokens"] = losses.per_group_sums(aux["nll"], weights, batch["source_ids"],
                                                                        num_sources)
    return terms, sums
  coefficients = {"ce": 1.0, **({"z": float(z_loss_weight)} if z_loss_weight else {})}
  return Objective(fn, coefficients, loss_term="ce")
