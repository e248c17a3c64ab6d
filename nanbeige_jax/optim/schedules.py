"""FG-WSD (Fine-Grained Warmup-Stable-Decay) learning-rate and data schedule, keyed on tokens seen.

Nanbeige4 pre-trains with a warmup, a constant-LR plateau split into phases whose data mixture gets better from phase to
phase, and a decay (with a long-context ABF extension inside it). Data switches are kept apart from LR regime changes:
no mixture / sequence-length / RoPE-base switch may land on the step where the warmup ends or the decay starts.

Timeline (all positions in tokens, exact Python ints on the host):

  [0, W)            warmup phase: LR 0 -> peak linearly; data of the first stable phase (or ``warmup_mixture``);
                    a step is trained at the LR where its tokens end (``step_lr``), so the first step's LR is > 0
  [W, D)            stable phases: LR = peak
  [D, D + decay)    decay phases: LR peak -> final_lr with ``decay_shape``
  tokens >= total   LR = final_lr; ``phase_at`` keeps answering the last phase (the trainer overshoots by < 1 step)

Precision of ``lr(tokens)``: token positions reach 2.3e13, where float32 spacing is ~2M tokens. ``lr`` therefore never
subtracts two large float32 numbers. It accepts
  * a Python/numpy integer (host, exact);
  * a ``SplitTokens(hi, lo)`` pair of int32 arrays, tokens = hi * 2**24 + lo (jit-safe and exact: the distance to
    every boundary is computed in integer arithmetic and only then converted to float32). Build it on the host with
    ``SplitTokens.from_int(n)``; this is what a jitted train step should take;
  * any other scalar/array (float32, float64 with x64, int32): used as-is; with x64 off, float32 resolves ~2M tokens
    at 23T, which only matters for the LR at the exact token of a boundary (the LR is continuous in tokens).
Inside ``jax.jit`` never pass a bare Python int above 2**31: jax would try to make it an int32 and fail.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import gin
import jax.numpy as jnp
import numpy as np

from nanbeige_jax.optim.phases import PHASE_KEYS, Phase, _check_mixture, _data_changes, _whole_tokens  # noqa: F401

DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "exponential")
SPLIT_BASE_BITS = 24
_SPLIT_BASE = 1 << SPLIT_BASE_BITS

# Paper constants (Nanbeige4-3B report, section 2.2: stage table of the Base model card).
PAPER_WARMUP_TOKENS = 100_000_000_000          # 0.1T, LR 0 -> 4.5e-4
PAPER_DIVERSITY_STABLE_TOKENS = 12_400_000_000_000  # 12.4T at 4.5e-4
PAPER_HIGH_QUALITY_STABLE_TOKENS = 6_500_000_000_000  # 6.5T at 4.5e-4
PAPER_DECAY_TOKENS = 4_000_000_000_000         # 4T, 4.5e-4 -> 1.5e-6, ABF long-context extension inside
PAPER_TOTAL_TOKENS = 23_000_000_000_000
PAPER_PEAK_LR = 4.5e-4
PAPER_FINAL_LR = 1.5e-6


class SplitTokens(NamedTuple):
  """An exact token count as two int32 arrays: tokens = hi * 2**24 + lo, 0 <= lo < 2**24 (a jit-friendly pytree)."""

  hi: Any
  lo: Any

  @classmethod
  def from_int(cls, tokens: int) -> "SplitTokens":
    tokens = int(tokens)
    if tokens < 0 or tokens >= (1 << (31 + SPLIT_BASE_BITS)):
      raise ValueError(f"SplitTokens: token count {tokens} outside [0, 2**55)")
    return cls(np.int32(tokens >> SPLIT_BASE_BITS), np.int32(tokens & (_SPLIT_BASE - 1)))

  def to_int(self) -> int:
    return int(self.hi) * _SPLIT_BASE + int(self.lo)


class Boundary(NamedTuple):
  """A position in the token stream where something changes. kind is one of: warmup_end, decay_start (LR regime
  changes), mixture, seq_len, rope_theta (data changes between ``before`` and ``after`` phases)."""

  tokens: int
  kind: str
  before: str
  after: str


@dataclasses.dataclass(frozen=True)
class PhasePlan:
  """One phase mapped onto optimizer steps: steps [start_step, start_step + num_steps) run ``phase`` at ``seq_len``
  with ``tokens_per_step`` tokens each; ``start_tokens`` is the tokens seen before the phase's first step."""

  index: int
  phase: Phase
  start_step: int
  num_steps: int
  seq_len: int | None
  tokens_per_step: int
  start_tokens: int

  @property
  def end_step(self) -> int:
    return self.start_step + self.num_steps

  @property
  def rows(self) -> int:
    """Rows (sequences) per optimizer step in this phase, all processes."""
    return self.tokens_per_step // self.seq_len if self.seq_len else 0


@gin.configurable(module="nanbeige_jax.optim")
@dataclasses.dataclass(frozen=True)
class FGWSDSchedule:
  """FG-WSD learning rate and data phases as a function of tokens seen (see the module docstring for the timeline).

  ``stable_phases``/``decay_phases`` take Phase objects or dicts with exactly the Phase keys. ``decay_phases`` must sum
  to ``decay_tokens``; when empty (and decay_tokens > 0) one phase named "decay" continues the last stable phase's
  data. ``warmup_mixture`` None means the warmup trains on the first stable phase's mixture.
  """

  warmup_tokens: int = 0
  peak_lr: float = 0.0
  stable_phases: tuple[Phase, ...] = ()
  decay_tokens: int = 0
  final_lr: float = 0.0
  decay_shape: str = "linear"
  decay_phases: tuple[Phase, ...] = ()
  warmup_mixture: dict[str, float] | None = None

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    set_("warmup_tokens", _whole_tokens(self.warmup_tokens, "FGWSDSchedule.warmup_tokens", allow_zero=True))
    set_("decay_tokens", _whole_tokens(self.decay_tokens, "FGWSDSchedule.decay_tokens", allow_zero=True))
    for name in ("peak_lr", "final_lr"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
          or not math.isfinite(value):
        raise ValueError(f"FGWSDSchedule.{name}: expected a finite number, found {value!r}")
      set_(name, float(value))
    if not self.peak_lr > 0:
      raise ValueError(f"FGWSDSchedule.peak_lr: expected > 0, found {self.peak_lr!r}")
    if not 0 <= self.final_lr <= self.peak_lr:
      raise ValueError(f"FGWSDSchedule.final_lr: expected 0 <= final_lr <= peak_lr={self.peak_lr}, "
                       f"found {self.final_lr!r}")
    if self.decay_shape not in DECAY_SHAPES:
      raise ValueError(f"FGWSDSchedule.decay_shape: expected one of {DECAY_SHAPES}, found {self.decay_shape!r}")
    if self.decay_shape == "exponential" and self.decay_tokens > 0 and self.final_lr <= 0:
      raise ValueError("FGWSDSchedule.final_lr: the exponential decay shape needs final_lr > 0, found 0")
    for field in ("stable_phases", "decay_phases"):
      specs = getattr(self, field)
      if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Sequence):
        raise ValueError(f"FGWSDSchedule.{field}: expected a list of phases, found {specs!r}")
      set_(field, tuple(Phase.from_any(s, f"FGWSDSchedule.{field}[{i}]") for i, s in enumerate(specs)))
    if not self.stable_phases:
      raise ValueError("FGWSDSchedule.stable_phases: expected at least one phase, found none")
    if self.decay_phases:
      decay_sum = sum(p.tokens for p in self.decay_phases)
      if decay_sum != self.decay_tokens:
        raise ValueError(f"FGWSDSchedule.decay_phases: token lengths sum to {decay_sum}, expected decay_tokens="
                         f"{self.decay_tokens}")
    if self.warmup_mixture is not None:
      set_("warmup_mixture", _check_mixture(self.warmup_mixture, "FGWSDSchedule.warmup"))
    names = [p.name for p in self.phases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise ValueError(f"FGWSDSchedule: phase names must be unique, found duplicates {duplicates} in {names}")
    # Step-independent part of the rule: a data switch at exactly the token of an LR regime change.
    lr_events = {b.tokens: b.kind for b in self.boundaries() if b.kind in ("warmup_end", "decay_start")}
    for b in self.boundaries():
      if b.kind not in ("warmup_end", "decay_start") and b.tokens in lr_events:
        raise ValueError(f"FGWSDSchedule: {b.kind} switch from phase {b.before!r} to {b.after!r} at token {b.tokens} "
                         f"coincides with the LR {lr_events[b.tokens]}; FG-WSD keeps data switches and LR changes on "
                         f"different steps")

  # ----------------------------------------------------------------------------------------------- timeline
  @property
  def phases(self) -> tuple[Phase, ...]:
    """Every phase in order: the warmup phase (if warmup_tokens > 0), the stable phases, the decay phases."""
    first = self.stable_phases[0]
    timeline = []
    if self.warmup_tokens > 0:
      timeline.append(Phase(name="warmup", tokens=self.warmup_tokens,
                            mixture=dict(self.warmup_mixture if self.warmup_mixture is not None else first.mixture),
                            seq_len=first.seq_len, rope_theta=first.rope_theta,
                            global_batch_size=first.global_batch_size))
    timeline.extend(self.stable_phases)
    if self.decay_phases:
      timeline.extend(self.decay_phases)
    elif self.decay_tokens > 0:
      last = self.stable_phases[-1]
      timeline.append(Phase(name="decay", tokens=self.decay_tokens, mixture=dict(last.mixture)))
    return tuple(timeline)

  def resolved_phases(self, seq_len: int | None = None, rope_theta: float | None = None,
                      global_batch_size: int | None = None) -> tuple[Phase, ...]:
    """``phases`` with seq_len / rope_theta / global_batch_size inheritance applied (defaults for the first phase:
    the arguments)."""
    resolved = []
    rows = global_batch_size
    for phase in self.phases:
      seq_len = phase.seq_len if phase.seq_len is not None else seq_len
      rope_theta = phase.rope_theta if phase.rope_theta is not None else rope_theta
      rows = phase.global_batch_size if phase.global_batch_size is not None else rows
      resolved.append(phase.replace(seq_len=seq_len, rope_theta=rope_theta, global_batch_size=rows))
    return tuple(resolved)

  def phase_starts(self) -> tuple[int, ...]:
    starts, position = [], 0
    for phase in self.phases:
      starts.append(position)
      position += phase.tokens
    return tuple(starts)

  @property
  def stable_tokens(self) -> int:
    return sum(p.tokens for p in self.stable_phases)

  @property
  def decay_start(self) -> int:
    return self.warmup_tokens + self.stable_tokens

  @property
  def total_tokens(self) -> int:
    return self.decay_start + self.decay_tokens

  def boundaries(self) -> list[Boundary]:
    """Token positions of every LR regime change (warmup_end, decay_start) and every data change between phases
    (mixture, seq_len, rope_theta), sorted by position (LR events first at equal positions)."""
    events = []
    if self.warmup_tokens > 0:
      events.append(Boundary(self.warmup_tokens, "warmup_end", "warmup", self.stable_phases[0].name))
    if self.decay_tokens > 0:
      events.append(Boundary(self.decay_start, "decay_start", self.stable_phases[-1].name, self.phases[
          len(self.phases) - (len(self.decay_phases) or 1)].name))
    resolved = self.resolved_phases()
    for start, prev, nxt in zip(self.phase_starts()[1:], resolved[:-1], resolved[1:]):
      for kind in _data_changes(prev, nxt):
        events.append(Boundary(start, kind, prev.name, nxt.name))
    order = {"warmup_end": 0, "decay_start": 1, "mixture": 2, "seq_len": 3, "rope_theta": 4}
    return sorted(events, key=lambda b: (b.tokens, order[b.kind]))

  def phase_at(self, tokens_seen: int) -> tuple[int, Phase]:
    """(index into ``phases``, Phase) in force for a step that starts after ``tokens_seen`` tokens (host, exact).
    Phase i covers [start_i, start_i + tokens_i); at or past total_tokens the last phase is returned."""
    tokens_seen = _whole_tokens(tokens_seen, "FGWSDSchedule.phase_at(tokens_seen)", allow_zero=True)
    phases, starts = self.phases, self.phase_starts()
    index = int(np.searchsorted(np.asarray(starts, dtype=np.int64), tokens_seen, side="right")) - 1
    return index, phases[index]

  # ----------------------------------------------------------------------------------------------- learning rate
  def lr(self, tokens_seen: Any) -> jnp.ndarray:
    """Learning rate (float32) after ``tokens_seen`` tokens; pure jnp, elementwise, jit-safe (see module docstring
    for the accepted token representations and their precision)."""
    offset = _offset_fn(tokens_seen)
    peak, final = self.peak_lr, self.final_lr
    since_start = offset(0)
    if self.warmup_tokens > 0:
      lr = peak * jnp.clip(since_start / np.float32(self.warmup_tokens), 0.0, 1.0)
    else:
      lr = jnp.where(since_start >= 0, np.float32(peak), np.float32(0.0))
    if self.decay_tokens > 0:
      since_decay = offset(self.decay_start)
      # Both the elapsed and the remaining fraction come from exact offsets, so neither end of the decay suffers
      # the cancellation of computing 1 - x in float32.
      x = jnp.clip(since_decay / np.float32(self.decay_tokens), 0.0, 1.0)
      remaining = jnp.clip(-offset(self.total_tokens) / np.float32(self.decay_tokens), 0.0, 1.0)
      lr = jnp.where(since_decay > 0, self._decay_value(x, remaining), lr)
    return lr.astype(jnp.float32)

  def _decay_value(self, x: jnp.ndarray, remaining: jnp.ndarray) -> jnp.ndarray:
    """LR at decay progress x in [0, 1] (remaining = 1 - x, computed separately for precision)."""
    peak, final = np.float32(self.peak_lr), np.float32(self.final_lr)
    if self.decay_shape == "exponential":
      value = peak * jnp.exp(x * np.float32(math.log(self.final_lr / self.peak_lr)))
      return jnp.where(remaining <= 0.0, final, value)
    if self.decay_shape == "linear":
      fraction = remaining
    elif self.decay_shape == "cosine":  # 0.5 * (1 + cos(pi x)) = sin^2(pi (1 - x) / 2)
      fraction = jnp.square(jnp.sin(np.float32(math.pi / 2) * remaining))
    else:  # "1-sqrt": 1 - sqrt(x) = (1 - x) / (1 + sqrt(x))
      fraction = remaining / (1.0 + jnp.sqrt(x))
    return final + (peak - final) * fraction

  def step_lr(self, tokens_seen: int, step_tokens: int) -> float:
    """The LR of the optimizer step that trains on tokens ``[tokens_seen, tokens_seen + step_tokens)``: the
    schedule at the end of that span (host, float64). Still keyed on tokens, and never 0 for the first step: with
    a warmup of W tokens and B tokens per step the first step runs at ``peak * B / W`` (the usual
    ``(step + 1) / warmup_steps``), the step that completes the warmup at the peak, and the last step of the decay
    at ``final_lr``. (``lr_host(tokens_seen)``, the LR at the start of the span, is 0 for the first step.)"""
    step_tokens = _whole_tokens(step_tokens, "FGWSDSchedule.step_lr(step_tokens)", allow_zero=False)
    tokens_seen = _whole_tokens(tokens_seen, "FGWSDSchedule.step_lr(tokens_seen)", allow_zero=True)
    return self.lr_host(tokens_seen + step_tokens)

  def lr_host(self, tokens_seen: int) -> float:
    """The same schedule in float64 on the host (reference for tests, logging, and step-0 printing)."""
    t = _whole_tokens(tokens_seen, "FGWSDSchedule.lr_host(tokens_seen)", allow_zero=True)
    if t < self.warmup_tokens:
      return self.peak_lr * t / self.warmup_tokens
    if self.decay_tokens == 0 or t <= self.decay_start:
      return self.peak_lr
    x = min((t - self.decay_start) / self.decay_tokens, 1.0)
    if self.decay_shape == "exponential":
      return self.final_lr if x >= 1.0 else self.peak_lr * (self.final_lr / self.peak_lr) ** x
    fraction = {"linear": 1.0 - x, "cosine": 0.5 * (1.0 + math.cos(math.pi * x)), "1-sqrt": 1.0 - math.sqrt(x)}
    return self.final_lr + (self.peak_lr - self.final_lr) * fraction[self.decay_shape]

  # ----------------------------------------------------------------------------------------------- steps
  def plan(self, tokens_per_step: int | Callable[[Phase], int], *, seq_len: int | None = None,
           rope_theta: float | None = None, start_step: int = 0, start_tokens: int = 0,
           global_batch_size: int | None = None) -> list[PhasePlan]:
    """Map the token schedule onto optimizer steps. ``tokens_per_step`` is an int or a function of the resolved
    Phase (e.g. ``lambda p: global_batch * p.seq_len``). Each phase runs whole steps until the tokens seen reach its
    end (the overshoot, < 1 step, carries into the next phase; a phase shorter than that overshoot gets 0 steps).
    So the phase of step k is always ``phase_at(tokens seen before step k)``.

    ``start_step``/``start_tokens``: the plan of a run that resumes at optimizer step ``start_step`` having seen
    ``start_tokens`` tokens (e.g. after a deliberate change of batch or sequence length): the remaining steps are
    planned from the token position, so the LR, phase and mixture follow the tokens seen, not the step count; the
    phases already consumed get 0 steps."""
    start_step = _whole_tokens(start_step, "FGWSDSchedule.plan(start_step)", allow_zero=True)
    start_tokens = _whole_tokens(start_tokens, "FGWSDSchedule.plan(start_tokens)", allow_zero=True)
    entries, step, seen, end = [], start_step, start_tokens, 0
    for index, phase in enumerate(self.resolved_phases(seq_len, rope_theta, global_batch_size)):
      tps = tokens_per_step(phase) if callable(tokens_per_step) else tokens_per_step
      if isinstance(tps, bool) or not isinstance(tps, (int, np.integer)) or tps <= 0:
        raise ValueError(f"tokens per step for phase {phase.name!r}: expected a positive int, found {tps!r}")
      tps = int(tps)
      end += phase.tokens
      num_steps = max(0, -(-(end - seen) // tps))
      entries.append(PhasePlan(index=index, phase=phase, start_step=step, num_steps=num_steps, seq_len=phase.seq_len,
                               tokens_per_step=tps, start_tokens=seen))
      step += num_steps
      seen += num_steps * tps
    return entries

  def validate(self, tokens_per_step: int | Callable[[Phase], int], *, seq_len: int | None = None,
               rope_theta: float | None = None, global_batch_size: int | None = None) -> list[PhasePlan]:
    """Check that no data switch (mixture, seq_len, rope_theta) takes effect on the step where the warmup ends or the
    decay starts, given the tokens per step; returns the step plan. A token event at position b takes effect on the
    first step that starts with >= b tokens seen; the decay start also owns the first step with > b tokens seen (the
    first step whose LR is below peak)."""
    plan = self.plan(tokens_per_step, seq_len=seq_len, rope_theta=rope_theta, global_batch_size=global_batch_size)
    by_name = {entry.phase.name: entry for entry in plan}
    lr_steps: dict[int, str] = {}
    if self.warmup_tokens > 0:
      lr_steps[by_name[self.stable_phases[0].name].start_step] = "warmup end"
    if self.decay_tokens > 0:
      first_decay = plan[len(plan) - (len(self.decay_phases) or 1)]
      lr_steps.setdefault(first_decay.start_step, "decay start")
      lr_moves = first_decay.start_step + (1 if first_decay.start_tokens == self.decay_start else 0)
      lr_steps.setdefault(lr_moves, "decay start")
    for b in self.boundaries():
      if b.kind in ("warmup_end", "decay_start"):
        continue
      step = by_name[b.after].start_step
      if step in lr_steps:
        raise ValueError(f"FGWSDSchedule: {b.kind} switch from phase {b.before!r} to {b.after!r} (token {b.tokens}) "
                         f"takes effect on step {step}, the same step as the LR {lr_steps[step]}; move the phase "
                         f"boundary by at least one step ({by_name[b.after].tokens_per_step} tokens)")
    return plan

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _offset_fn(tokens_seen: Any) -> Callable[[int], jnp.ndarray]:
  """Returns offset(b) = tokens_seen - b as float32, exact near b for exact token representations."""
  if isinstance(tokens_seen, SplitTokens):
    hi = jnp.asarray(tokens_seen.hi, jnp.int32)
    lo = jnp.asarray(tokens_seen.lo, jnp.int32)

    def offset(b: int) -> jnp.ndarray:
      d_hi = (hi - np.int32(b >> SPLIT_BASE_BITS)).astype(jnp.float32)
      d_lo = (lo - np.int32(b & (_SPLIT_BASE - 1))).astype(jnp.float32)
      return d_hi * np.float32(_SPLIT_BASE) + d_lo
    return offset
  if isinstance(tokens_seen, (int, np.integer)) and not isinstance(tokens_seen, bool):
    return _offset_fn(SplitTokens.from_int(int(tokens_seen)))
  tokens = jnp.asarray(tokens_seen)
  if not jnp.issubdtype(tokens.dtype, jnp.floating):
    tokens = tokens.astype(jnp.float32)
  return lambda b: (tokens - jnp.asarray(b, tokens.dtype)).astype(jnp.float32)


@gin.configurable(module="nanbeige_jax.optim")
def wsd_schedule(warmup_tokens: int, stable_tokens: int, decay_tokens: int, peak_lr: float, final_lr: float,
                 mixture: Mapping[str, float], decay_shape: str = "linear", seq_len: int | None = None,
                 rope_theta: float | None = None) -> FGWSDSchedule:
  """Plain (vanilla) WSD for ablations: one stable phase, one mixture throughout, no data switches."""
  return FGWSDSchedule(
      warmup_tokens=warmup_tokens, peak_lr=peak_lr, decay_tokens=decay_tokens, final_lr=final_lr,
      decay_shape=decay_shape,
      stable_phases=[Phase(name="stable", tokens=stable_tokens, mixture=dict(mixture), seq_len=seq_len,
                           rope_theta=rope_theta)])


def plan_steps(schedule: FGWSDSchedule, global_batch: int, seq_len: int | None = None,
               rope_theta: float | None = None, *, start_step: int = 0, start_tokens: int = 0) -> list[PhasePlan]:
  """Steps per phase for a global batch of ``global_batch`` sequences whose length follows each phase's seq_len
  (``seq_len`` is the default for phases that inherit none). Validates the FG-WSD step rule on the way; the trainer's
  total number of steps is ``plan[-1].end_step``. ``start_step``/``start_tokens``: the remaining plan of a resumed
  run (``FGWSDSchedule.plan``), after the whole schedule was validated for this batch."""
  if isinstance(global_batch, bool) or not isinstance(global_batch, (int, np.integer)) or global_batch <= 0:
    raise ValueError(f"plan_steps: global_batch must be a positive int, found {global_batch!r}")

  def tokens_per_step(phase: Phase) -> int:
    if phase.seq_len is None:
      raise ValueError(f"plan_steps: phase {phase.name!r} has no seq_len; set it in the schedule or pass seq_len=")
    return phase.global_batch_size * phase.seq_len
  plan = schedule.validate(tokens_per_step, seq_len=seq_len, rope_theta=rope_theta,
                           global_batch_size=int(global_batch))
  if start_step or start_tokens:
    plan = schedule.plan(tokens_per_step, seq_len=seq_len, rope_theta=rope_theta, start_step=start_step,
                         start_tokens=start_tokens, global_batch_size=int(global_batch))
  return plan


def total_steps(schedule: FGWSDSchedule, global_batch: int, seq_len: int | None = None) -> int:
  return plan_steps(schedule, global_batch, seq_len)[-1].end_step
