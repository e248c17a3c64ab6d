"""Fault tolerance of pre-training (issue 6): exact resume after SIGKILL and SIGTERM, atomic and verified
checkpoints with fallback past corrupt ones, keep-last-N protection, the non-finite policy, and bad input that fails
with one line before anything is written.

Runs ``launch/pretrain.py`` as a subprocess (2 fake CPU devices) on the tiny run of ``benchmarks/faults.py``: the
"test" model preset, a 384-piece tokenizer, 16 steps of 4 x 32 tokens, a checkpoint every 2 steps.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal

import numpy as np
import pytest

from nanbeige_jax import checkpoint as ckpt_lib
from nanbeige_jax.config import ConfigError, build, parse_gin
from nanbeige_jax.train import resume

_spec = importlib.util.spec_from_file_location(
    "faults_harness", pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)

SIGTERM_DEADLINE_S = 30.0  # generous bound for a loaded 2-core CI machine; measured ~1-4 s (docs/faults.md)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  base = tmp_path_factory.mktemp("faults")
  corpus = faults.write_corpus(base)
  tokenizer = faults.train_test_tokenizer(base, corpus)
  return {"base": base, "corpus": corpus, "tokenizer": tokenizer,
          "bindings": faults.bindings(tokenizer, corpus)}


@pytest.fixture(scope="module")
def reference(assets):
  workdir = assets["base"] / "reference"
  proc = faults.run(workdir, assets["bindings"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = faults.step_records(workdir)
  assert sorted(records) == list(range(1, faults.TOTAL_STEPS + 1))
  assert all(np.isfinite(loss) for loss, _ in records.values())
  return {"workdir": workdir, "records": records}


def snapshot(path: pathlib.Path) -> dict[str, tuple[int, int]]:
  """Every file under ``path`` with its size and mtime (to prove nothing was written)."""
  return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


one_line_error = faults.one_line_error


# --- 1 + 2: exact resume after SIGKILL, then SIGTERM ------------------------------------------------------------
def test_sigkill_then_sigterm_resume_exactly(assets, reference):
  workdir = assets["base"] / "chain"
  killed = faults.run_interrupted(workdir, assets["bindings"], 5, signal.SIGKILL)
  assert killed["returncode"] == -signal.SIGKILL
  ckpt_after_kill = faults.latest_checkpoint(workdir)
  assert ckpt_after_kill is not None and ckpt_after_kill < faults.TOTAL_STEPS
  # The resumed run is preempted with SIGTERM after step 11: it finishes the step, checkpoints and exits 0.
  term = faults.run_interrupted(workdir, assets["bindings"], 11, signal.SIGTERM)
  assert term["returncode"] == 0, term["output"][-2000:]
  assert term["exit_seconds"] < SIGTERM_DEADLINE_S
  assert "SIGTERM received" in term["output"] and "preempted (SIGTERM)" in term["output"]
  last_logged = max(faults.logged_steps(workdir))
  assert last_logged < faults.TOTAL_STEPS
  assert faults.latest_checkpoint(workdir) == last_logged  # nothing trained was lost
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["stopped"].startswith("preempted (SIGTERM)") and summary["last_checkpoint"] == last_logged
  done = faults.run(workdir, assets["bindings"])
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads((workdir / "summary.json").read_text())["start_step"] == last_logged
  # Every step logged once (rows of the interrupted runs past their checkpoints were dropped), each equal to the
  # uninterrupted run's loss and grad-norm bit for bit.
  records = faults.step_records(workdir)
  assert sorted(records) == sorted(reference["records"])
  for step, (loss, grad_norm) in reference["records"].items():
    assert records[step] == (loss, grad_norm), (step, records[step], (loss, grad_norm))


# --- 3: corrupt latest checkpoint -> fallback; interrupted save ignored; nothing usable -> clear error ----------
def _truncate_arrays(step_dir: pathlib.Path) -> None:
  files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for p in files:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_falls_back(assets, reference):
  workdir = assets["base"] / "corrupt"
  shutil.copytree(reference["workdir"], workdir)
  ckpt = workdir / "checkpoints"
  assert faults.latest_checkpoint(workdir) == 16
  _truncate_arrays(ckpt / "16")
  # What a process killed in the middle of writing step 18 leaves behind: an uncommitted tmp directory.
  shutil.copytree(ckpt / "14", ckpt / f"18{ckpt_lib.TMP_SUFFIX}-1700000000")
  proc = faults.run(workdir, assets["bindings"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"checkpoint {ckpt / '16'} is unusable" in proc.stderr
  assert f"previous good checkpoint {ckpt / '14'}" in proc.stderr
  moved = list((workdir / resume.CORRUPT_DIRNAME).iterdir())
  assert [p.name.split(".")[0] for p in moved] == ["16"]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["start_step"] == 14 and summary["final_step"] == 16
  records = faults.step_records(workdir)  # steps 15, 16 re-run after the fallback, each logged once
  assert records == reference["records"]
  with ckpt_lib.CheckpointManager(ckpt, create=False) as manager:
    assert manager.all_steps() == [12, 14, 16]
    restored = manager.restore(16)
    assert restored.data_state["tokens_seen"] == 16 * 128

  # No step restores any more: a clear one-line error naming every step's path; nothing is written or moved.
  for step in (12, 14, 16):
    (ckpt / str(step) / "metadata" / "metadata").write_text('{"format_version": 1, "model_con')
  before = snapshot(workdir)
  proc = faults.run(workdir, assets["bindings"])
  line = one_line_error(proc)
  assert line.startswith(f"error: no usable checkpoint in {ckpt}: step 16 ")
  for step in (12, 14, 16):
    assert str(ckpt / str(step) / "metadata" / "metadata") in line
  assert "--fresh" in line
  assert snapshot(workdir) == before


def _tiny_params(value: float):
  return {"w": np.full((4, 3), value, np.float32), "b": np.arange(3, dtype=np.float32)}


def test_keep_last_n_never_deletes_newest_good(tmp_path):
  from nanbeige_jax.model import get_preset
  metadata = ckpt_lib.build_metadata(get_preset("test"), stage="pretrain")
  manager = ckpt_lib.CheckpointManager(tmp_path / "checkpoints", max_to_keep=None, async_save=False)

  def save(step):
    manager.save(step, params=_tiny_params(step), metadata=metadata, data_state={"iterator": {}})

  save(1)
  save(2)
  assert resume.prune_checkpoints(manager, keep=2) == []
  # The next two saves are broken on disk (e.g. a storage fault after the commit).
  for step in (3, 4):
    save(step)
    (manager.step_dir(step) / "metadata" / "metadata").write_text("{not json")
  assert resume.prune_checkpoints(manager, keep=2) == []
  assert manager.all_steps() == [1, 2]  # the broken steps were moved aside, the good ones kept
  assert sorted(p.name.split(".")[0] for p in (tmp_path / resume.CORRUPT_DIRNAME).iterdir()) == ["3", "4"]
  save(5)
  assert resume.prune_checkpoints(manager, keep=2) == [1]
  assert manager.all_steps() == [2, 5]
  save(6)
  (manager.step_dir(6) / "params").rename(tmp_path / "lost_params")  # a step missing an item
  assert resume.prune_checkpoints(manager, keep=1) == [2]
  assert manager.all_steps() == [5]  # keep=1 still keeps the newest *good* step
  np.testing.assert_array_equal(manager.restore(5).params["w"], _tiny_params(5)["w"])
  manager.close()


def test_truncate_metrics_drops_rows_after_the_restored_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')  # cut short by a kill
  assert resume.truncate_metrics(path, 4) == 3
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
  assert resume.truncate_metrics(path, 4) == 0
  assert resume.truncate_metrics(tmp_path / "absent.jsonl", 0) == 0


# --- 4 (+ 5, skip_bad_lines): the non-finite policy, end to end ------------------------------------------------
def test_nonfinite_policy_skips_then_stops_with_last_good_checkpoint(assets):
  bad_corpus = faults.write_corpus(assets["base"], bad_lines=(3, 50))
  workdir = assets["base"] / "nonfinite"
  # Step 3 is non-finite once (skipped, counted, training goes on); steps 7.. are all non-finite: the run stops
  # after 3 in a row. Malformed JSONL lines are skipped and counted (skip_bad_lines).
  bindings = faults.bindings(assets["tokenizer"], bad_corpus, fault_nonfinite_steps=[3, 7, 8, 9, 10, 11, 12],
                             max_consecutive_nonfinite=3, skip_bad_lines=True)
  proc = faults.run(workdir, bindings)
  line = one_line_error(proc)
  assert line.startswith("stopped: 3 consecutive non-finite steps (limit 3) ending at step 9")
  assert f"last good checkpoint ({workdir / 'checkpoints' / '8'}) is intact" in line
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["skipped_bad_lines"] == {"b": 2}
  assert summary["skipped_steps"] == 5  # 3, 7, 8, 9 and 10 (dispatched before the streak was read)
  records = faults.step_records(workdir)
  assert np.isnan(records[3][0]) and np.isfinite(records[4][0]) and np.isfinite(records[6][0])
  assert all(np.isnan(records[s][0]) for s in (7, 8, 9)) and max(records) == 9  # step 10 ran but was not logged
  with ckpt_lib.CheckpointManager(workdir / "checkpoints", create=False) as manager:
    assert manager.all_steps() == [4, 6, 8]
    at6, at8 = manager.restore(6), manager.restore(8)
  # Skipped updates leave params untouched: checkpoint 8 (after non-finite steps 7, 8) holds step 6's params.
  np.testing.assert_array_equal(np.concatenate([np.ravel(x) for x in _leaves(at6.params)]),
                                np.concatenate([np.ravel(x) for x in _leaves(at8.params)]))
  assert all(np.isfinite(x).all() for x in _leaves(at8.params))
  assert at8.data_state["skipped_steps"] == 3 and at8.data_state["nonfinite_streak"] == 2


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# --- 5: bad input: one line, nothing written ---------------------------------------------------------------------
def _build(assets, corpus=None, **overrides):
  from nanbeige_jax.train.pretrain import PretrainConfig
  parse_gin(["pretrain/tiny.gin"], faults.bindings(assets["tokenizer"], corpus or assets["corpus"], **overrides))
  return build(PretrainConfig)


def _fails_before_writing(assets, name, pattern, corpus=None, **overrides):
  from nanbeige_jax.train.pretrain import run_pretrain
  workdir = assets["base"] / f"bad_{name}"
  with pytest.raises(ValueError, match=pattern) as info:
    run_pretrain(_build(assets, corpus, **overrides), workdir)
  assert "\n" not in str(info.value)
  assert not workdir.exists(), f"{name}: {sorted(workdir.rglob('*'))}"


def test_bad_input_in_process(assets):
  base = assets["base"]
  bad = base / "malformed.jsonl"
  bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": 3}\n')
  _fails_before_writing(assets, "malformed", "^" + re.escape(f"{bad}:3: field 'text' is int, expected str") + "$", corpus=bad)
  empty = base / "empty.jsonl"
  empty.write_text("\n\n")
  _fails_before_writing(assets, "empty", r"jsonl source 'b' .* has no documents", corpus=empty)
  _fails_before_writing(assets, "missing", r"source 'b': no file matches .*/absent\.jsonl",
                        corpus=base / "absent.jsonl")
  _fails_before_writing(assets, "vocab", r"tokenizer .* has 384 pieces but the model's vocab_size is 256",
                        model_overrides={"vocab_size": 256})
  _fails_before_writing(assets, "seq_len", r"phase 'warmup': seq_len 32 exceeds the model's "
                        r"max_position_embeddings 16", model_overrides={"vocab_size": 384, "max_position_embeddings": 16})
  _fails_before_writing(assets, "mesh", r"^PretrainConfig.mesh .*: mesh: mesh \{'data': 3, 'fsdp': 1, 'tensor': 1\} needs 3 devices but 8 are "
                        r"available$",
                        mesh={"data": 3, "fsdp": 1, "tensor": 1})
  _fails_before_writing(assets, "tok_vocab", r"tokenizer_vocab_size 4096 exceeds the model's vocab_size 384",
                        tokenizer_path=None, tokenizer_vocab_size=4096)
  # A workdir holding another stage's checkpoint (e.g. SFT) is not resumed into.
  from nanbeige_jax.model import get_preset
  from nanbeige_jax.train.pretrain import run_pretrain
  sft_workdir = base / "sft_workdir"
  ckpt_lib.save_params_checkpoint(sft_workdir / "checkpoints", _tiny_params(1.0),
                                  ckpt_lib.build_metadata(get_preset("test"), stage="sft"), step=3)
  before = snapshot(sft_workdir)
  with pytest.raises(resume.ResumeError, match=r"checkpoint step 3 is a 'sft' checkpoint, not a pre-training one"):
    run_pretrain(_build(assets), sft_workdir)
  assert snapshot(sft_workdir) == before
  # Mixture weights and gin errors fail while building the config, before run_pretrain is even called.
  for mixture, pattern in (({"a": -1.0, "b": 1.0}, r"mixture\['a'\]: expected a finite weight >= 0, found -1.0"),
                           ({"a": 0.0, "b": 0.0}, r"weights must have a positive sum")):
    with pytest.raises(ConfigError, match=pattern):
      from nanbeige_jax.train.pretrain import PretrainConfig
      parse_gin(["pretrain/tiny.gin"], faults.bindings(assets["tokenizer"], assets["corpus"]) + [
          f"FGWSDSchedule.stable_phases = [{{'name': 's1', 'tokens': 768, 'mixture': {mixture!r}}}]"])
      build(PretrainConfig)
  with pytest.raises(ConfigError, match=r"PretrainConfig.max_consecutive_nonfinite: expected an int >= 0"):
    _build(assets, max_consecutive_nonfinite=-1)
  with pytest.raises(ConfigError, match=r"PretrainConfig.fault_nonfinite_steps: expected a list of steps >= 1"):
    _build(assets, fault_nonfinite_steps=[0])


def test_bad_input_through_the_launcher(assets, reference):
  base = assets["base"]
  # Unknown and mistyped gin parameters.
  for binding, pattern in (("PretrainConfig.seq_lenn = 3", "seq_lenn"),
                           ("PretrainConfig.seq_len = 'long'", "PretrainConfig.seq_len: expected a positive int")):
    workdir = base / "bad_gin"
    line = one_line_error(faults.run(workdir, assets["bindings"] + [binding], timeout=120))
    assert pattern in line and not workdir.exists()
  # A malformed JSONL line: file and line number.
  bad = base / "malformed_launcher.jsonl"
  bad.write_text('{"text": "one"}\n\n{"text": "two"\n')
  workdir = base / "bad_jsonl"
  line = one_line_error(faults.run(workdir, faults.bindings(assets["tokenizer"], bad), timeout=120))
  assert line.startswith(f"error: {bad}:3: ") and not workdir.exists()


def test_refuses_checkpoint_of_another_model_unless_fresh(assets, reference):
  workdir = assets["base"] / "other_model"
  shutil.copytree(reference["workdir"], workdir)
  before = snapshot(workdir)
  other = assets["bindings"] + ["PretrainConfig.model_overrides = {'vocab_size': 384, 'intermediate_size': 64}"]
  line = one_line_error(faults.run(workdir, other, timeout=120))
  assert line.startswith(f"error: {workdir} holds a checkpoint (step 16) of a different model")
  assert "intermediate_size: checkpoint 96 vs config 64" in line and "--fresh" in line
  assert snapshot(workdir) == before
  proc = faults.run(workdir, other, ["--fresh", "--max_steps", "2"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  aside = [p.name for p in workdir.iterdir() if p.name.startswith(("checkpoints.old.", "metrics.jsonl.old."))]
  assert len(aside) == 2
  assert sorted(faults.step_records(workdir)) == [1, 2]
  with ckpt_lib.CheckpointManager(workdir / "checkpoints", create=False) as manager:
    assert manager.all_steps() == [2]
    assert manager.read_metadata(2)["model_config"]["intermediate_size"] == 64
