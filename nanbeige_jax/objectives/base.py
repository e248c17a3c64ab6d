"""The objective interface every trainer's loss implements (see ``nanbeige_jax.objectives``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

Terms = dict[str, tuple[jax.Array, jax.Array]]  # term -> (sum over the micro-batch, its weight)
# fn(model, batch, rope_theta, frozen) -> (terms, sums); ``frozen`` maps a role ("reference", "teacher", ...) to a
# model (an nnx module merged from the step's non-donated frozen parameters); ``sums`` are extra per-batch sums
# (e.g. per-source losses) added up across micro-batches and returned in the step's metrics.
ObjectiveFn = Callable[[Any, dict[str, jax.Array], jax.Array, dict[str, Any]], tuple[Terms, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Objective:
  """``fn`` computes the terms; ``coefficients`` weight them in the objective that is minimised (each term divided by
  its own global weight first); ``loss_term`` is the term logged as ``loss`` (default: the first coefficient).
  ``frozen_roles`` names the frozen models ``fn`` reads (the trainer refuses a step without them)."""

  fn: ObjectiveFn
  coefficients: Mapping[str, float]
  loss_term: str | None = None
  frozen_roles: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.coefficients:
      raise ValueError("Objective.coefficients: expected at least one term")
    for name, coef in self.coefficients.items():
      if isinstance(coef, bool) or not isinstance(coef, (int, float)):
        raise ValueError(f"Objective.coefficients[{name!r}]: expected a number, found {coef!r}")
    if not any(float(c) != 0 for c in self.coefficients.values()):
      raise ValueError(f"Objective.coefficients: every coefficient is 0 ({dict(self.coefficients)})")
    if self.loss_term is not None and self.loss_term not in self.coefficients:
      raise ValueError(f"Objective.loss_term: {self.loss_term!r} is not a term {sorted(self.coefficients)}")
    object.__setattr__(self, "coefficients", {k: float(v) for k, v in self.coefficients.items()})
    object.__setattr__(self, "frozen_roles", tuple(self.frozen_roles))

  @property
  def logged_term(self) -> str:
    return self.loss_term or next(iter(self.coefficients))

  @property
  def reference_term(self) -> str:
    """The term whose gradient is accumulated unscaled (the first with a non-zero coefficient)."""
    return next(t for t, c in self.coefficients.items() if c != 0)

  def __call__(self, model: Any, batch: dict[str, jax.Array], rope_theta: Any,
               frozen: dict[str, Any] | None = None) -> tuple[Terms, dict[str, jax.Array]]:
    terms, sums = self.fn(model, batch, rope_theta, frozen or {})
    if set(terms) != set(self.coefficients):
      raise ValueError(f"objective returned terms {sorted(terms)}, its coefficients name {sorted(self.coefficients)}")
    return terms, sums
