"""FG-WSD schedule: LR values at and around every boundary (all decay shapes), phase lookup, step planning with a
sequence-length change, validation errors, and every shipped gin file."""
import dataclasses
import glob
import math
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanbeige_jax.optim import schedules
from nanbeige_jax.optim.schedules import (DECAY_SHAPES, FGWSDSchedule, Phase, SplitTokens, plan_steps, total_steps,
                                          wsd_schedule)

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "schedules")
TINY_DOMAINS = {"shakespeare", "python_stdlib", "arithmetic"}


def load_gin(name: str) -> FGWSDSchedule:
  gin.clear_config()
  try:
    gin.parse_config_file(os.path.join(CONFIG_DIR, name))
    return FGWSDSchedule()
  finally:
    gin.clear_config()


@pytest.fixture(scope="module")
def tiny() -> FGWSDSchedule:
  return load_gin("fgwsd_tiny.gin")


@pytest.fixture(scope="module")
def paper() -> FGWSDSchedule:
  return load_gin("fgwsd_paper.gin")


def probe_points(schedule: FGWSDSchedule) -> list[int]:
  points = {0, 1, schedule.total_tokens - 1, schedule.total_tokens, schedule.total_tokens + 1}
  for start in schedule.phase_starts()[1:] + (schedule.warmup_tokens, schedule.decay_start):
    points.update({start - 1, start, start + 1})
  return sorted(points)


def decay_fraction(shape: str, x: float, peak: float, final: float) -> float:
  """Independent closed forms at a point of the decay (used to anchor lr_host)."""
  if shape == "exponential":
    return peak * (final / peak) ** x
  f = {"linear": 1 - x, "cosine": 0.5 * (1 + math.cos(math.pi * x)), "1-sqrt": 1 - math.sqrt(x)}[shape]
  return final + (peak - final) * f


@pytest.mark.parametrize("which", ["tiny", "paper"])
@pytest.mark.parametrize("shape", DECAY_SHAPES)
def test_lr_at_and_around_every_boundary(which, shape, request):
  schedule = dataclasses.replace(request.getfixturevalue(which), decay_shape=shape)
  peak, final, w, d, total = (schedule.peak_lr, schedule.final_lr, schedule.warmup_tokens, schedule.decay_start,
                              schedule.total_tokens)
  # Closed-form anchors for the host reference.
  assert schedule.lr_host(0) == 0.0
  assert schedule.lr_host(w // 2) == pytest.approx(peak * (w // 2) / w, rel=1e-12)
  assert schedule.lr_host(w) == peak and schedule.lr_host(d) == peak
  assert schedule.lr_host(total) == pytest.approx(final, rel=1e-12)
  assert schedule.lr_host(total + 10**9) == pytest.approx(final, rel=1e-12)
  mid = d + schedule.decay_tokens // 2
  x = (mid - d) / schedule.decay_tokens
  assert schedule.lr_host(mid) == pytest.approx(decay_fraction(shape, x, peak, final), rel=1e-12)

  points = probe_points(schedule)
  host = np.array([schedule.lr_host(p) for p in points])
  exact = np.array([float(schedule.lr(p)) for p in points])  # Python ints: exact split representation
  split = SplitTokens(np.array([SplitTokens.from_int(p).hi for p in points], np.int32),
                      np.array([SplitTokens.from_int(p).lo for p in points], np.int32))
  jitted = np.asarray(jax.jit(schedule.lr)(split))
  np.testing.assert_allclose(exact, host, rtol=2e-6, atol=0)
  np.testing.assert_allclose(jitted, host, rtol=2e-6, atol=0)  # XLA may fuse differently: compare to the reference
  # Shape of the curve across the probes: rising during warmup, flat on the plateau, falling in the decay.
  for p, value in zip(points, exact):
    if p < w:
      assert value < peak
    elif p <= d:
      assert value == np.float32(peak)
    else:
      assert value <= np.float32(peak)


@pytest.mark.parametrize("shape", DECAY_SHAPES)
def test_tiny_lr_resolves_single_tokens_at_regime_changes(tiny, shape):
  schedule = dataclasses.replace(tiny, decay_shape=shape)
  w, d, peak = schedule.warmup_tokens, schedule.decay_start, np.float32(schedule.peak_lr)
  assert float(schedule.lr(w - 1)) < peak == float(schedule.lr(w)) == float(schedule.lr(w + 1))
  assert float(schedule.lr(d - 1)) == float(schedule.lr(d)) == peak > float(schedule.lr(d + 4096))
  if shape != "cosine":  # the cosine starts flat: 1 token in, the drop (~1e-11 relative) is below float32 resolution
    assert float(schedule.lr(d + 1)) < peak
  assert float(schedule.lr(schedule.total_tokens)) == pytest.approx(schedule.final_lr, rel=1e-5)


def test_split_tokens_give_exact_offsets_at_23t(paper):
  d = paper.decay_start
  for delta in (-1, 0, 1, 4096):
    offset = schedules._offset_fn(SplitTokens.from_int(d + delta))
    assert float(offset(d)) == float(delta)
    assert float(jax.jit(lambda s: schedules._offset_fn(s)(d))(SplitTokens.from_int(d + delta))) == float(delta)
  # Plain float32 token counts cannot see one token at 19T (documented precision limit).
  assert float(schedules._offset_fn(jnp.float32(d + 1))(d)) == 0.0
  assert SplitTokens.from_int(d + 12345).to_int() == d + 12345
  with pytest.raises(ValueError, match="outside"):
    SplitTokens.from_int(-1)


def test_float_and_int32_inputs(tiny):
  points = np.array([0, 1000, tiny.warmup_tokens, tiny.decay_start + 5000, tiny.total_tokens], np.int64)
  want = np.array([tiny.lr_host(int(p)) for p in points])
  np.testing.assert_allclose(np.asarray(tiny.lr(jnp.asarray(points, jnp.float32))), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.jit(tiny.lr)(jnp.asarray(points, jnp.int32))), want, rtol=1e-5)


@pytest.mark.parametrize("which", ["tiny", "paper"])
def test_phase_at_boundaries(which, request):
  schedule = request.getfixturevalue(which)
  phases, starts = schedule.phases, schedule.phase_starts()
  assert schedule.phase_at(0) == (0, phases[0])
  for i, start in enumerate(starts[1:], start=1):
    assert schedule.phase_at(start - 1)[0] == i - 1
    assert schedule.phase_at(start) == (i, phases[i])
    assert schedule.phase_at(start + 1)[0] == i
  last = len(phases) - 1
  assert schedule.phase_at(schedule.total_tokens - 1)[0] == last
  assert schedule.phase_at(schedule.total_tokens + 10**6)[0] == last
  with pytest.raises(ValueError, match="phase_at"):
    schedule.phase_at(-1)


def test_paper_schedule_matches_the_reported_stages(paper):
  assert paper.total_tokens == schedules.PAPER_TOTAL_TOKENS == 23 * 10**12
  assert paper.warmup_tokens == schedules.PAPER_WARMUP_TOKENS
  assert [p.tokens for p in paper.stable_phases] == [schedules.PAPER_DIVERSITY_STABLE_TOKENS,
                                                     schedules.PAPER_HIGH_QUALITY_STABLE_TOKENS]
  assert paper.decay_tokens == schedules.PAPER_DECAY_TOKENS and paper.decay_start == 19 * 10**12
  assert (paper.peak_lr, paper.final_lr) == (schedules.PAPER_PEAK_LR, schedules.PAPER_FINAL_LR)
  kinds = [(b.tokens, b.kind) for b in paper.boundaries()]
  assert (10**11, "warmup_end") in kinds and (19 * 10**12, "decay_start") in kinds
  assert (125 * 10**11, "mixture") in kinds
  # The long-context (ABF) phase lies inside the decay and changes seq_len and RoPE base.
  long_ctx = [b for b in paper.boundaries() if b.kind in ("seq_len", "rope_theta")]
  assert {b.kind for b in long_ctx} == {"seq_len", "rope_theta"}
  assert all(paper.decay_start < b.tokens < paper.total_tokens for b in long_ctx)
  resolved = paper.resolved_phases()
  assert resolved[-1].seq_len == 65536 and resolved[-1].rope_theta > resolved[1].rope_theta
  assert "long_cot" in paper.decay_phases[-1].mixture


def test_every_shipped_gin_file_parses_and_validates():
  files = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.gin")))
  assert {os.path.basename(f) for f in files} >= {"fgwsd_paper.gin", "fgwsd_tiny.gin", "wsd.gin"}
  for path in files:
    schedule = load_gin(os.path.basename(path))
    # Tiny-scale files: 16 x 256-token sequences per step; the paper file sets its own seq_len (1024 sequences).
    batch, seq_len = (1024, None) if schedule.resolved_phases()[0].seq_len else (16, 256)
    plan = plan_steps(schedule, batch, seq_len)
    assert plan[-1].end_step > 0, path
    assert sum(e.num_steps * e.tokens_per_step for e in plan) >= schedule.total_tokens


def test_tiny_and_wsd_configs_are_a_matched_ablation(tiny):
  assert tiny.peak_lr > tiny.final_lr > 0 and tiny.decay_shape in ("1-sqrt", "linear")
  for phase in tiny.phases:
    assert set(phase.mixture) == TINY_DOMAINS
  diverse, high_quality = tiny.stable_phases
  assert (diverse.name, high_quality.name) == ("diverse", "high_quality")
  code_math = lambda p: p.normalized_mixture()["python_stdlib"] + p.normalized_mixture()["arithmetic"]  # noqa: E731
  assert code_math(high_quality) > code_math(diverse)
  assert 5e5 <= tiny.total_tokens <= 4e6
  assert total_steps(tiny, 16, 256) == tiny.total_tokens // 4096
  wsd = load_gin("wsd.gin")
  assert (wsd.total_tokens, wsd.warmup_tokens, wsd.decay_tokens, wsd.peak_lr, wsd.final_lr, wsd.decay_shape) == (
      tiny.total_tokens, tiny.warmup_tokens, tiny.decay_tokens, tiny.peak_lr, tiny.final_lr, tiny.decay_shape)
  assert [b.kind for b in wsd.boundaries()] == ["warmup_end", "decay_start"]
  average = {k: sum(p.tokens * p.normalized_mixture()[k] for p in tiny.phases) / tiny.total_tokens
             for k in TINY_DOMAINS}
  for k, v in wsd.stable_phases[0].normalized_mixture().items():
    assert v == pytest.approx(average[k], abs=1e-4)


def test_plan_steps_with_seq_len_change():
  schedule = FGWSDSchedule(
      warmup_tokens=1024, peak_lr=1e-3, final_lr=1e-5, decay_tokens=6144,
      stable_phases=[{"name": "a", "tokens": 8192, "mixture": {"x": 1.0}, "seq_len": 128},
                     {"name": "b", "tokens": 4000, "mixture": {"x": 1.0, "y": 1.0}}],
      decay_phases=[{"name": "d1", "tokens": 2048, "mixture": {"x": 1.0, "y": 1.0}},
                    {"name": "long", "tokens": 4096, "mixture": {"y": 1.0}, "seq_len": 512, "rope_theta": 1e6}])
  plan = plan_steps(schedule, global_batch=4)
  summary = [(e.phase.name, e.start_step, e.num_steps, e.seq_len, e.start_tokens) for e in plan]
  # 512 tokens/step until "long", then 2048; "b" ends at 13312 (26 steps), overshoot 0 -> d1 at token 13312.
  assert summary == [("warmup", 0, 2, 128, 0), ("a", 2, 16, 128, 1024), ("b", 18, 8, 128, 9216),
                     ("d1", 26, 4, 128, 13312), ("long", 30, 2, 512, 15360)]
  assert plan[-1].end_step == total_steps(schedule, 4) == 32
  # Each step's phase is phase_at(tokens seen before the step).
  seen = 0
  for entry in plan:
    for _ in range(entry.num_steps):
      assert schedule.phase_at(seen)[0] == entry.index
      seen += entry.tokens_per_step
  assert seen >= schedule.total_tokens
  with pytest.raises(ValueError, match="no seq_len"):
    plan_steps(dataclasses.replace(schedule, stable_phases=[{"name": "a", "tokens": 8192, "mixture": {"x": 1.0}},
                                                            schedule.stable_phases[1]]), 4)


def _three_phase(**overrides) -> FGWSDSchedule:
  spec = dict(warmup_tokens=4096, peak_lr=1e-3, final_lr=1e-5, decay_tokens=8192,
              stable_phases=[{"name": "diverse", "tokens": 40960, "mixture": {"a": 0.7, "b": 0.3}},
                             {"name": "hq", "tokens": 40960, "mixture": {"a": 0.3, "b": 0.7}}],
              decay_phases=[{"name": "anneal", "tokens": 8192, "mixture": {"a": 0.3, "b": 0.7}}])
  spec.update(overrides)
  return FGWSDSchedule(**spec)


def test_mixture_switch_on_the_decay_start_step_is_rejected():
  base = _three_phase()
  base.validate(4096)
  # Switch 100 tokens after the decay start: fine in tokens, but with 4096-token steps it lands on the same step.
  late = _three_phase(decay_phases=[{"name": "anneal", "tokens": 100, "mixture": {"a": 0.3, "b": 0.7}},
                                    {"name": "reasoning", "tokens": 8092, "mixture": {"b": 1.0}}])
  late.validate(64)
  with pytest.raises(ValueError, match=r"mixture switch from phase 'anneal' to 'reasoning'.*step 22.*decay start"):
    late.validate(4096)
  # Exactly at the decay start: rejected at construction, whatever the step size.
  with pytest.raises(ValueError, match=r"mixture switch from phase 'hq' to 'reasoning'.*decay_start"):
    _three_phase(decay_phases=[{"name": "reasoning", "tokens": 8192, "mixture": {"b": 1.0}}])
  # Same rule for the warmup end: with 3000-token steps the warmup (4096 tokens) ends inside step 1, so step 2 is the
  # first at peak LR; the 10-token first phase gets no step of its own and its switch also lands on step 2.
  short_first = _three_phase(stable_phases=[{"name": "tiny_first", "tokens": 10, "mixture": {"a": 1.0}},
                                            {"name": "diverse", "tokens": 40950, "mixture": {"a": 0.7, "b": 0.3}},
                                            {"name": "hq", "tokens": 40960, "mixture": {"a": 0.3, "b": 0.7}}])
  short_first.validate(4096)  # 4096-token steps: tiny_first runs on step 1, diverse starts on step 2
  with pytest.raises(ValueError, match=r"from phase 'tiny_first' to 'diverse'.*step 2.*warmup end"):
    short_first.validate(3000)
  with pytest.raises(ValueError, match="coincides with the LR warmup_end"):
    _three_phase(warmup_mixture={"b": 1.0})
  # A seq_len change is a data switch too.
  with pytest.raises(ValueError, match="seq_len switch"):
    _three_phase(decay_phases=[{"name": "anneal", "tokens": 8192, "mixture": {"a": 0.3, "b": 0.7},
                                "seq_len": 1024}])


@pytest.mark.parametrize("overrides,message", [
    ({"stable_phases": [{"name": "x", "tokens": 10, "mixture": {"a": -0.1, "b": 1.0}}]}, r"mixture\['a'\].*>= 0"),
    ({"stable_phases": [{"name": "x", "tokens": 10, "mixture": {"a": 0.0}}]}, "positive sum"),
    ({"stable_phases": [{"name": "x", "tokens": 10, "mixture": {"a": 1.0}, "tokenz": 3}]},
     r"stable_phases\[0\]: unknown key\(s\) \['tokenz'\]"),
    ({"stable_phases": [{"name": "x", "mixture": {"a": 1.0}}]}, r"missing key\(s\) \['tokens'\]"),
    ({"stable_phases": [{"name": "x", "tokens": 0, "mixture": {"a": 1.0}}]}, "> 0"),
    ({"stable_phases": [{"name": "x", "tokens": 10.5, "mixture": {"a": 1.0}}]}, "whole number"),
    ({"stable_phases": []}, "at least one"),
    ({"final_lr": 2e-3}, "final_lr"),
    ({"final_lr": -1e-6}, "final_lr"),
    ({"peak_lr": 0.0}, "peak_lr"),
    ({"decay_shape": "step"}, "decay_shape"),
    ({"decay_shape": "exponential", "final_lr": 0.0}, "exponential"),
    ({"decay_tokens": 9000}, "sum to 8192"),
    ({"warmup_tokens": -5}, "warmup_tokens"),
    ({"decay_phases": [{"name": "diverse", "tokens": 8192, "mixture": {"a": 0.3, "b": 0.7}}]}, "unique"),
])
def test_validation_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    _three_phase(**overrides)


def test_bad_tokens_per_step():
  with pytest.raises(ValueError, match="positive int"):
    _three_phase().validate(0)
  with pytest.raises(ValueError, match="global_batch"):
    plan_steps(_three_phase(), 0, 128)


def test_gin_bad_key_is_one_line_error():
  gin.clear_config()
  try:
    gin.parse_config("""
      FGWSDSchedule.peak_lr = 1e-3
      FGWSDSchedule.stable_phases = [{"name": "s", "tokens": 100, "mixture": {"a": 1.0}, "seqlen": 64}]
    """)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['seqlen'\]"):
      FGWSDSchedule()
  finally:
    gin.clear_config()


def test_plain_wsd_helper():
  schedule = wsd_schedule(warmup_tokens=100, stable_tokens=1000, decay_tokens=300, peak_lr=1e-3, final_lr=0.0,
                          mixture={"a": 1.0}, decay_shape="cosine")
  assert [p.name for p in schedule.phases] == ["warmup", "stable", "decay"]
  assert all(p.mixture == {"a": 1.0} for p in schedule.phases)
  assert [b.kind for b in schedule.boundaries()] == ["warmup_end", "decay_start"]
  assert float(schedule.lr(1100 + 150)) == pytest.approx(0.5e-3, rel=1e-6)
  assert float(schedule.lr(1400)) == 0.0


def test_first_step_trains_at_a_nonzero_lr():
  """Issue 11 item 7: the trainer asked for the LR at the start of a step's tokens, so step 0 ran at LR 0."""
  from nanbeige_jax.optim.schedules import wsd_schedule
  schedule = wsd_schedule(1000, 3000, 1000, 1e-3, 1e-5, {"web": 1.0}, decay_shape="linear")
  step_tokens = 100
  assert schedule.lr_host(0) == 0.0
  assert schedule.step_lr(0, step_tokens) == pytest.approx(1e-3 * 100 / 1000)  # (step + 1) / warmup_steps
  lrs = [schedule.step_lr(t, step_tokens) for t in range(0, schedule.total_tokens, step_tokens)]
  assert all(lr > 0 for lr in lrs) and lrs[9] == 1e-3 and lrs[-1] == pytest.approx(1e-5)
  # Keyed on tokens: the same span end gives the same LR whatever the step size.
  assert schedule.step_lr(150, 50) == schedule.step_lr(100, 100) == schedule.lr_host(200)
  with pytest.raises(ValueError, match="step_tokens"):
    schedule.step_lr(0, 0)
