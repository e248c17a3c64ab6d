"""One span of an FG-WSD schedule (``Phase``: tokens, data mixture, and optionally its own sequence length, RoPE base
and rows per step) and the checks the schedule shares: whole token counts, mixtures, what changes between phases."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from nanbeige_jax.config import strict_replace

PHASE_KEYS = ("name", "tokens", "mixture", "seq_len", "rope_theta", "global_batch_size")


def _whole_tokens(value: Any, where: str, *, allow_zero: bool) -> int:
  """A token count given as int or float (12.4e12) -> exact int; fractional, negative or non-numbers raise."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f"{where}: expected a number of tokens, found {value!r}")
  if isinstance(value, (float, np.floating)):
    if not math.isfinite(value) or value != math.floor(value):
      raise ValueError(f"{where}: expected a whole number of tokens, found {value!r}")
  tokens = int(value)
  if tokens < 0 or (tokens == 0 and not allow_zero):
    raise ValueError(f"{where}: expected {'>= 0' if allow_zero else '> 0'} tokens, found {value!r}")
  return tokens


def _check_mixture(mixture: Any, where: str) -> dict[str, float]:
  if not isinstance(mixture, Mapping) or not mixture:
    raise ValueError(f"{where}.mixture: expected a non-empty dict of source name -> weight, found {mixture!r}")
  checked = {}
  for source, weight in mixture.items():
    if not isinstance(source, str) or not source:
      raise ValueError(f"{where}.mixture: source names must be non-empty strings, found {source!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)):
      raise ValueError(f"{where}.mixture[{source!r}]: expected a number, found {weight!r}")
    if not math.isfinite(weight) or weight < 0:
      raise ValueError(f"{where}.mixture[{source!r}]: expected a finite weight >= 0, found {weight!r}")
    checked[source] = float(weight)
  if sum(checked.values()) <= 0:
    raise ValueError(f"{where}.mixture: weights must have a positive sum, found {mixture!r}")
  return checked


@dataclasses.dataclass(frozen=True)
class Phase:
  """One span of the data schedule.

  ``tokens`` is the length in tokens (a float such as 12.4e12 is accepted if it is a whole number). ``mixture`` maps
  data-source names to non-negative weights (normalised by the data pipeline). ``seq_len`` / ``rope_theta`` /
  ``global_batch_size`` of None inherit the previous phase's value (the first phase inherits the run's defaults);
  setting the first two implements the long-context ABF extension, and ``global_batch_size`` (rows per optimizer
  step, all processes) keeps the tokens per step sane when the rows get longer (e.g. 64 rows of 64K tokens after
  1024 rows of 4K: 4M tokens a step in both).
  """

  name: str
  tokens: int
  mixture: dict[str, float]
  seq_len: int | None = None
  rope_theta: float | None = None
  global_batch_size: int | None = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"Phase.name: expected a non-empty string, found {self.name!r}")
    where = f"Phase {self.name!r}"
    object.__setattr__(self, "tokens", _whole_tokens(self.tokens, f"{where}.tokens", allow_zero=False))
    object.__setattr__(self, "mixture", _check_mixture(self.mixture, where))
    if self.seq_len is not None and (isinstance(self.seq_len, bool) or not isinstance(self.seq_len, (int, np.integer))
                                     or self.seq_len <= 0):
      raise ValueError(f"{where}.seq_len: expected a positive int or None, found {self.seq_len!r}")
    if self.seq_len is not None:
      object.__setattr__(self, "seq_len", int(self.seq_len))
    rows = self.global_batch_size
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows <= 0):
      raise ValueError(f"{where}.global_batch_size: expected a positive int (rows per step) or None, found {rows!r}")
    if rows is not None:
      object.__setattr__(self, "global_batch_size", int(rows))
    if self.rope_theta is not None:
      if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float, np.integer, np.floating)) \
          or not self.rope_theta > 1:
        raise ValueError(f"{where}.rope_theta: expected a number > 1 or None, found {self.rope_theta!r}")
      object.__setattr__(self, "rope_theta", float(self.rope_theta))

  @classmethod
  def from_any(cls, spec: "Phase | Mapping[str, Any]", where: str) -> "Phase":
    """A Phase, or a dict with exactly the Phase keys (name, tokens, mixture required)."""
    if isinstance(spec, Phase):
      return spec
    if not isinstance(spec, Mapping):
      raise ValueError(f"{where}: expected a Phase or a dict with keys {PHASE_KEYS}, found {spec!r}")
    unknown = sorted(set(spec) - set(PHASE_KEYS))
    if unknown:
      raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys: {list(PHASE_KEYS)}")
    missing = [k for k in ("name", "tokens", "mixture") if k not in spec]
    if missing:
      raise ValueError(f"{where}: missing key(s) {missing}; allowed keys: {list(PHASE_KEYS)}")
    return cls(**spec)

  def normalized_mixture(self) -> dict[str, float]:
    """Weights summing to 1 with zero-weight sources dropped (what the data actually sees)."""
    total = sum(self.mixture.values())
    return {k: v / total for k, v in sorted(self.mixture.items()) if v > 0}

  def replace(self, **changes: Any) -> "Phase":
    return strict_replace(self, **changes)


def _same_mixture(a: Phase, b: Phase) -> bool:
  ma, mb = a.normalized_mixture(), b.normalized_mixture()
  return ma.keys() == mb.keys() and all(abs(ma[k] - mb[k]) <= 1e-12 for k in ma)


def _data_changes(prev: Phase, nxt: Phase) -> list[str]:
  """What differs between two consecutive resolved phases: subset of ['mixture', 'seq_len', 'rope_theta']."""
  changes = []
  if not _same_mixture(prev, nxt):
    changes.append("mixture")
  if prev.seq_len != nxt.seq_len:
    changes.append("seq_len")
  if prev.rope_theta != nxt.rope_theta:
    changes.append("rope_theta")
  return changes
