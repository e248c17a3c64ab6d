"""The language-modelling objective (pre-training, and SFT whose loss weights are the assistant mask): next-token
cross-entropy ``ce`` over weighted tokens and, when ``z_loss_weight`` > 0, the z-loss ``z`` (``lse^2``), each a term
divided by the global token count; per-source sums for per-domain loss reporting."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

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


def eval_sums(trainer: Any, params: Any, batches: Any, rope_theta: float, num_sources: int
              ) -> tuple[float, float, dict[str, np.ndarray]]:
  """``(loss_sum, weight_sum, per-source sums)`` of ``trainer.eval_step`` over an iterable of host batches."""
  loss_sum = weight_sum = 0.0
  sums = {"source_nll": np.zeros(num_sources), "source_tokens": np.zeros(num_sources)}
  for batch in batches:
    out = trainer.eval_step(params, batch, rope_theta)
    loss_sum += float(out["loss_sum"])
    weight_sum += float(out["weight_sum"])
    for key in sums:
      sums[key] += np.asarray(out["sums"][key])
  return loss_sum, weight_sum, sums


def per_source_losses(sums: dict[str, Any], names: list[str], *, prefix: str) -> dict[str, float]:
  """``{prefix + name: mean loss}`` for the sources with tokens in ``sums`` (the LM loss's per-source sums)."""
  nll, tokens = np.asarray(sums["source_nll"]), np.asarray(sums["source_tokens"])
  return {f"{prefix}{n}": float(nll[i] / tokens[i]) for i, n in enumerate(names) if tokens[i] > 0}
