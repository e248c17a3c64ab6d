"""Nothing silently wrong on resume (issue 11): the operative RoPE base and phase travel with every checkpoint, a
restart with a changed batch/sequence length/schedule is refused or (deliberately) continues at the saved token
count, silent corruption falls back to the last verified step, non-finite parameters are never saved, and a run
whose every step after a restore is non-finite names the restored checkpoint.

Runs ``launch/pretrain.py`` as a subprocess (2 fake CPU devices) on the small run of ``benchmarks/faults.py``:
4 x 32 = 128 tokens per step, warmup 2 steps, s1 6, s2 4, decay 4 = 16 steps, a checkpoint every 2 steps.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest

from nanbeige_jax import checkpoint as ckpt_lib
from nanbeige_jax.model import get_preset
from nanbeige_jax.optim.schedules import FGWSDSchedule, Phase
from nanbeige_jax.train import resume
from nanbeige_jax.train.checkpointing import Checkpointer, model_config_from_metadata
from nanbeige_jax.train.state import TrainState

_spec = importlib.util.spec_from_file_location(
    "faults_harness", pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)

# The stable and decay phases train at RoPE base 1e6 while the preset says 5e6 (as the paper's FG-WSD does).
THETA = ["FGWSDSchedule.stable_phases = [{'name': 's1', 'tokens': 768, 'mixture': {'a': 0.5, 'b': 0.5}, "
         "'rope_theta': 1e6}, {'name': 's2', 'tokens': 512, 'mixture': {'a': 0.8, 'b': 0.2}}]"]
TOKENS_PER_STEP = 128


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  base = tmp_path_factory.mktemp("silent")
  corpus = faults.write_corpus(base)
  tokenizer = faults.train_test_tokenizer(base, corpus)
  return {"base": base, "bindings": faults.bindings(tokenizer, corpus) + THETA}


@pytest.fixture(scope="module")
def reference(assets):
  workdir = assets["base"] / "reference"
  proc = faults.run(workdir, assets["bindings"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {"workdir": workdir, "records": faults.step_records(workdir)}


def rows(workdir: pathlib.Path) -> dict[int, dict]:
  return {r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


one_line_error = faults.one_line_error


def test_operative_rope_base_and_phase_travel_with_every_checkpoint(assets, reference):
  preset = get_preset("test", vocab_size=384)
  assert preset.rope_theta != 1e6
  ckpt = reference["workdir"] / "checkpoints"
  with ckpt_lib.CheckpointManager(ckpt, create=False) as manager:
    assert manager.all_steps() == [12, 14, 16]
    for step, phase in ((12, "s2"), (16, "decay")):
      meta = manager.read_metadata(step)
      assert meta["rope_theta"] == 1e6 and meta["phase"] == phase
      assert meta["model_config"]["rope_theta"] == 1e6
      assert meta["model_fingerprint"] == preset.replace(rope_theta=1e6).fingerprint() != preset.fingerprint()
      assert meta["tokens_seen"] == step * TOKENS_PER_STEP
      assert meta["run"]["global_batch_size"] == 4
      # What every loader (SFT init, eval, sampler, HF export) builds from it: the base it was trained at.
      assert model_config_from_metadata(meta, str(ckpt)).rope_theta == 1e6
  # Resuming the finished run is accepted: the checkpoint's base is the one its phase trains at.
  proc = faults.run(reference["workdir"], assets["bindings"])
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_first_step_is_not_at_lr_zero(reference):
  first = rows(reference["workdir"])[1]
  schedule = FGWSDSchedule(warmup_tokens=256, peak_lr=first["lr"] * 2, stable_phases=[
      Phase(name="s", tokens=10_000, mixture={"a": 1.0})])
  assert first["lr"] > 0 and first["lr"] == pytest.approx(schedule.step_lr(0, TOKENS_PER_STEP))


def test_changed_batch_is_refused_then_continues_at_the_saved_tokens(assets, reference):
  workdir = assets["base"] / "rebatch"
  proc = faults.run(workdir, assets["bindings"] + ["PretrainConfig.max_steps = 6"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  doubled = assets["bindings"] + ["PretrainConfig.global_batch_size = 8"]
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  line = one_line_error(faults.run(workdir, doubled))
  assert "PretrainConfig.global_batch_size=4" in line and "8" in line and "--allow_resume_changes" in line
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
  # A changed schedule names the field that changed.
  line = one_line_error(faults.run(workdir, assets["bindings"] + ["FGWSDSchedule.peak_lr = 1e-2"]))
  assert "PretrainConfig.schedule.peak_lr" in line

  proc = faults.run(workdir, doubled, ["--allow_resume_changes"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  logged = rows(workdir)
  first = logged[7]  # the first step after the resume at step 6 (768 tokens), now 8 x 32 = 256 tokens a step
  schedule = FGWSDSchedule(warmup_tokens=256, peak_lr=logged[3]["lr"], final_lr=logged[3]["lr"], stable_phases=[
      Phase(name="s1", tokens=768, mixture={"a": 1.0}), Phase(name="s2", tokens=512, mixture={"a": 1.0})],
      decay_tokens=512)
  assert first["tokens_seen"] == 6 * TOKENS_PER_STEP + 256
  assert first["phase"] == "s1" and first["lr"] == pytest.approx(schedule.step_lr(768, 256))
  assert logged[8]["phase"] == "s2" and logged[8]["tokens_seen"] == 1280
  assert logged[7]["rope_theta"] == 1e6
  # 2048 - 768 = 1280 tokens remain: 5 steps of 256.
  assert max(logged) == 11 and logged[11]["tokens_seen"] == 2048
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["final_step"] == 11 and summary["total_steps"] == 11


def _flip_bytes(step_dir: pathlib.Path, count: int = 64) -> int:
  files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for p in files:
    data = bytearray(p.read_bytes())
    for i in range(min(count, len(data))):
      data[(i * 7919) % len(data)] ^= 0xFF
    p.write_bytes(bytes(data))
  return len(files)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_silent_corruption_falls_back_and_keeps_the_good_checkpoints(assets, reference):
  """The issue's trial: flip 64 bytes in each params data file of the newest step, rerun."""
  workdir = assets["base"] / "flipped"
  shutil.copytree(reference["workdir"], workdir)
  ckpt = workdir / "checkpoints"
  assert _flip_bytes(ckpt / "16")
  proc = faults.run(workdir, assets["bindings"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"checkpoint {ckpt / '16'} is unusable" in proc.stderr
  assert [p.name.split(".")[0] for p in (workdir / resume.CORRUPT_DIRNAME).iterdir()] == ["16"]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["start_step"] == 14 and summary["final_step"] == 16 and summary["skipped_steps"] == 0
  assert faults.step_records(workdir) == reference["records"]  # the re-run steps equal the uncorrupted run's
  with ckpt_lib.CheckpointManager(ckpt, create=False) as manager:
    assert manager.all_steps() == [12, 14, 16]
    for step in (12, 14, 16):
      restored = manager.restore(step)  # verifies every array's checksum
      assert all(np.isfinite(x).all() for x in __import__("jax").tree.leaves(restored.params))


def test_all_nonfinite_after_a_restore_names_the_restored_checkpoint(assets, reference):
  workdir = assets["base"] / "bad_restore"
  shutil.copytree(reference["workdir"], workdir)
  shutil.rmtree(workdir / "checkpoints" / "16")
  faulty = assets["bindings"] + ["PretrainConfig.fault_nonfinite_steps = [15, 16]",
                                 "PretrainConfig.max_consecutive_nonfinite = 2"]
  line = one_line_error(faults.run(workdir, faulty))
  assert line.startswith("stopped: 2 consecutive non-finite steps")
  assert f"every step since the restore of {workdir / 'checkpoints' / '14'} was non-finite" in line
  assert "likely corrupt" in line


def _state(value: float) -> TrainState:
  params = {"w": np.full((4, 3), value, np.float32), "b": np.arange(3, dtype=np.float32)}
  zero = np.zeros((), np.int32)
  return TrainState(step=zero, params=params, opt_state={"mu": params}, skipped_steps=zero, bad_streak=zero)


def test_non_finite_parameters_are_never_saved(tmp_path):
  meta = ckpt_lib.build_metadata(get_preset("test"), stage="pretrain")
  checkpointer = Checkpointer(tmp_path / "ckpt", metadata=lambda step: meta, data_state_fn=lambda: {"iterator": {}},
                              keep=1, async_save=False)
  assert checkpointer.save(2, _state(1.0))
  assert not checkpointer.save(4, _state(float("nan")))
  assert not checkpointer.save(6, _state(float("inf")))
  assert checkpointer.skipped_nonfinite == [4, 6]
  checkpointer.close()
  with ckpt_lib.CheckpointManager(tmp_path / "ckpt", create=False) as manager:
    assert manager.all_steps() == [2]  # keep=1 never lost the only good step
