"""One rollout batch split into several optimizer minibatches (the rollout -> update cycle of on-policy RL).

A rollout step samples ``prompts x G`` completions with the current parameters, scores them and computes advantages
over each group of ``G``; the update then takes ``num_minibatches`` optimizer steps over that one batch (PPO/GRPO
"minibatches", optionally for several epochs). ``RolloutBuffer`` holds the batch as a dict of host arrays with a
common leading dimension and yields the minibatches: whole groups stay together (so a group's samples, whose
advantages are relative to each other, are in one update), the order is shuffled per epoch from a seed (the same
seed gives the same split: resumable), and every row is used exactly once per epoch.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np


class RolloutBuffer:
  """``RolloutBuffer(rows, *, group_size=1)``: ``rows`` maps names to arrays whose first dimension is the number of
  samples N (N divisible by ``group_size``; groups are ``group_size`` consecutive rows)."""

  def __init__(self, rows: dict[str, Any], *, group_size: int = 1):
    if not rows:
      raise ValueError("RolloutBuffer: no arrays given")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
      raise ValueError(f"RolloutBuffer.group_size: expected a positive int, found {group_size!r}")
    self.rows = {k: np.asarray(v) for k, v in rows.items()}
    sizes = {k: v.shape[0] if v.ndim else None for k, v in self.rows.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()) or n is None:
      raise ValueError(f"RolloutBuffer: arrays disagree on the number of samples (first dimension): {sizes}")
    if n % group_size:
      raise ValueError(f"RolloutBuffer: {n} samples are not whole groups of group_size={group_size}")
    self.size, self.group_size = n, group_size

  @property
  def num_groups(self) -> int:
    return self.size // self.group_size

  def minibatches(self, num_minibatches: int, *, epochs: int = 1, seed: int | None = 0
                  ) -> Iterator[dict[str, np.ndarray]]:
    """``epochs * num_minibatches`` dicts of ``N / num_minibatches`` rows each, whole groups only. ``seed`` None:
    rows in order (no shuffle); else each epoch is a permutation of the groups drawn from ``(seed, epoch)``."""
    if isinstance(num_minibatches, bool) or not isinstance(num_minibatches, int) or num_minibatches < 1:
      raise ValueError(f"minibatches: num_minibatches must be a positive int, found {num_minibatches!r}")
    if self.num_groups % num_minibatches:
      raise ValueError(f"minibatches: {self.num_groups} groups of {self.group_size} cannot be split into "
                       f"{num_minibatches} equal minibatches")
    per = self.num_groups // num_minibatches
    for epoch in range(epochs):
      groups = np.arange(self.num_groups)
      if seed is not None:
        groups = np.random.default_rng([seed, epoch]).permutation(self.num_groups)
      for j in range(num_minibatches):
        chosen = groups[j * per:(j + 1) * per]
        index = (chosen[:, None] * self.group_size + np.arange(self.group_size)[None, :]).reshape(-1)
        yield {k: v[index] for k, v in self.rows.items()}
