"""A run's workdir on a non-local scheme (issue 12, defect 2): every path a run writes or reads goes through
``nanbeige_jax.paths``. A tiny pre-training run whose workdir is ``memory://`` writes its metrics, summary,
operative config, trained tokenizer and plot there, and resumes there (metrics truncated before the writer
re-downloads them); a ``gs://`` workdir reaches orbax unchanged (an emulated bucket, no network); quarantine,
``--fresh`` and metric truncation work on a non-local scheme; one run-dir resolution serves init_from, eval and the
refinement models.

orbax writes array items through tensorstore, whose kvstore drivers are file, gcs, s3 (and its own in-process
memory driver, which orbax cannot address): an fsspec ``memory://`` directory is refused by orbax ("Checkpoint path
should be absolute"). The ``memory://`` run therefore keeps its checkpoints in a local directory (``StageRun.ckpt_dir``
redirected); everything else of the run is on ``memory://``.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import orbax.checkpoint as ocp
import pytest

from nanbeige_jax import checkpoint as ckpt_lib
from nanbeige_jax import paths
from nanbeige_jax.config import build, parse_gin
from nanbeige_jax.metrics import read_metrics
from nanbeige_jax.train import resume, stage
from nanbeige_jax.train.checkpointing import move_run_aside, resolve_run_dirs, RunError
from test_paths import _FakeGcs, fake_gcs  # noqa: F401  (fixture)

ROOT = "memory://run-paths"


def _bindings(corpus: pathlib.Path, **overrides) -> list[str]:
  sources = {"a": {"kind": "arithmetic", "num_train": 200, "num_eval": 20},
             "b": {"kind": "jsonl", "paths": str(corpus)}}
  out = ["PretrainConfig.model_preset = 'test'", "PretrainConfig.model_overrides = {'vocab_size': 384}",
         f"PretrainConfig.sources = {sources!r}",
         "FGWSDSchedule.warmup_tokens = 512",
         "FGWSDSchedule.stable_phases = [{'name': 's1', 'tokens': 2048, 'mixture': {'a': 0.5, 'b': 0.5}}]",
         "FGWSDSchedule.decay_tokens = 1024", "FGWSDSchedule.decay_phases = []",
         "PretrainConfig.seq_len = 32", "PretrainConfig.global_batch_size = 8",
         "PretrainConfig.tokenizer_vocab_size = 384", "PretrainConfig.tokenizer_train_docs = 100",
         "PretrainConfig.log_every_steps = 1", "PretrainConfig.checkpoint_every_steps = 2",
         "PretrainConfig.eval_every_steps = 1000", "PretrainConfig.eval_batches = 1",
         "PretrainConfig.async_checkpointing = False"]
  return out + [f"PretrainConfig.{k} = {v!r}" for k, v in overrides.items()]


def _corpus(directory: pathlib.Path) -> pathlib.Path:
  words = "the of and king queen sword river stone light night day".split()
  path = directory / "corpus.jsonl"
  path.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(40))}) + "\n"
                          for i in range(120)))
  return path


def test_pretrain_workdir_on_memory_writes_and_resumes_there(tmp_path, monkeypatch):
  from nanbeige_jax.train.pretrain import PretrainConfig, run_pretrain
  workdir = f"{ROOT}/pretrain"
  local_ckpt = tmp_path / "checkpoints"  # orbax cannot write arrays to memory:// (module docstring)
  monkeypatch.setattr(stage.StageRun, "ckpt_dir", property(lambda self: paths.as_path(str(local_ckpt))))
  monkeypatch.chdir(tmp_path)  # a path wrongly treated as local would appear here as a 'memory:' folder
  corpus = _corpus(tmp_path)
  try:
    parse_gin(["pretrain/tiny.gin"], _bindings(corpus, max_steps=4, plot=True))
    summary = run_pretrain(build(PretrainConfig), workdir, operative_config="# operative\n")
    assert summary["final_step"] == 4 and summary["plot"] == paths.join(workdir, "run.png")
    for name in ("metrics.jsonl", "summary.json", "operative_config.gin", "tokenizer.model", "run.png"):
      assert paths.is_file(paths.join(workdir, name)), name
    assert paths.glob(paths.join(workdir, "tb", "*"))  # TensorBoard events uploaded
    assert json.loads(paths.read_text(paths.join(workdir, "summary.json")))["workdir"] == workdir
    assert paths.read_text(paths.join(workdir, "operative_config.gin")) == "# operative\n"
    assert [r["step"] for r in read_metrics(paths.join(workdir, "metrics.jsonl")) if "loss" in r] == [1, 2, 3, 4]
    # The interrupted run's rows after the last checkpoint: dropped on resume, before the writer downloads the file.
    paths.append_text(paths.join(workdir, "metrics.jsonl"), json.dumps({"step": 5, "loss": 9.0}) + "\n{\"step\": 6")
    parse_gin(["pretrain/tiny.gin"], _bindings(corpus, max_steps=6))
    summary = run_pretrain(build(PretrainConfig), workdir)
    assert summary["start_step"] == 4 and summary["final_step"] == 6
    rows = [r for r in read_metrics(paths.join(workdir, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[4]["loss"] != 9.0
    assert not any(p.startswith("memory") for p in os.listdir(tmp_path))
  finally:
    paths.rmtree(workdir)


def test_gs_workdir_reaches_orbax_unchanged(fake_gcs, tmp_path, monkeypatch):  # noqa: F811
  from orbax.checkpoint._src.path import gcs_utils
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  run = stage.StageRun(cfg=None, workdir=paths.as_path("gs://bucket/run"), fresh=False, stop=None)
  assert os.fspath(run.ckpt_dir) == "gs://bucket/run/checkpoints"
  manager = ckpt_lib.CheckpointManager(run.ckpt_dir, max_to_keep=None, async_save=False)
  # What the old code did: pathlib.Path("gs://bucket/run/checkpoints").absolute() is a local folder 'gs:/bucket/...'.
  assert os.fspath(manager.directory) == "gs://bucket/run/checkpoints"
  assert os.fspath(manager._manager.directory) == "gs://bucket/run/checkpoints"  # pylint: disable=protected-access
  assert manager.all_steps() == [] and resume.check_workdir(run.ckpt_dir, lambda s, m: None) is None
  manager.close()
  # A step on the bucket (JSON items: orbax's array writer would need the real GCS) is listed and read through the
  # layer by the wrapper and the read-only pre-flight.
  raw = ocp.CheckpointManager(paths.orbax_directory("gs://bucket/run/checkpoints"),
                              item_handlers={"params": ocp.JsonCheckpointHandler(filename="metadata"),
                                             "metadata": ocp.JsonCheckpointHandler(filename="metadata")})
  raw.save(3, args=ocp.args.Composite(params=ocp.args.JsonSave({}), metadata=ocp.args.JsonSave(
      {"format_version": 1, "stage": "pretrain"})))
  raw.wait_until_finished()
  raw.close()
  manager = ckpt_lib.CheckpointManager("gs://bucket/run/checkpoints", max_to_keep=None, create=False)
  assert manager.all_steps() == [3] and manager.read_metadata(3)["stage"] == "pretrain"
  # Quarantine on the bucket: the step moves out of the directory orbax scans, next to it.
  moved = resume.quarantine_step(manager, 3, "test")
  manager.close()
  assert os.fspath(moved).startswith("gs://bucket/run/checkpoints.corrupt/3.")
  assert paths.is_file(paths.join(moved, "metadata", "metadata"))
  assert not paths.exists("gs://bucket/run/checkpoints/3")
  assert ckpt_lib.CheckpointManager("gs://bucket/run/checkpoints", create=False).all_steps() == []
  assert not os.path.exists(tmp_path / "gs:")


def test_truncate_metrics_and_fresh_on_memory():
  workdir = f"{ROOT}/truncate"
  try:
    metrics = paths.join(workdir, "metrics.jsonl")
    paths.write_text(metrics, "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4))
                     + '{"step": 5, "lo')
    assert resume.truncate_metrics(metrics, 2) == 3
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2]
    assert resume.truncate_metrics(metrics, 2) == 0
    paths.write_text(paths.join(workdir, "checkpoints", "2", "x"), "step")
    moved = move_run_aside(workdir)
    stamp = int(time.time())
    assert sorted(os.fspath(m).rsplit(".", 1)[0] for m in moved) == [
        paths.join(workdir, "checkpoints.old"), paths.join(workdir, "metrics.jsonl.old")]
    assert all(abs(int(os.fspath(m).rsplit(".", 1)[1]) - stamp) <= 2 for m in moved)
    assert not paths.exists(metrics) and not paths.exists(paths.join(workdir, "checkpoints"))
    assert any(paths.read_text(paths.join(m, "2", "x")) == "step" for m in moved if "checkpoints" in os.fspath(m))
  finally:
    paths.rmtree(workdir)


def test_one_run_dir_resolution(tmp_path):
  """A run workdir or its checkpoint directory, local or on another scheme; the same answer for init_from, eval
  and the refinement models (which all call paths.resolve_run_dirs)."""
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  for given in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
    ckpt, run_dir = resolve_run_dirs(given)
    assert (os.fspath(ckpt), os.fspath(run_dir)) == (str(tmp_path / "run" / "checkpoints"), str(tmp_path / "run"))
  with pytest.raises(RunError, match="SFTConfig.init_from: '.*nowhere' does not exist"):
    resolve_run_dirs(tmp_path / "nowhere", what="SFTConfig.init_from:")
  try:
    paths.write_text(f"{ROOT}/resolve/checkpoints/1/x", "")
    for given in (f"{ROOT}/resolve", f"{ROOT}/resolve/checkpoints"):
      ckpt, run_dir = paths.resolve_run_dirs(given)
      assert (os.fspath(ckpt), os.fspath(run_dir)) == (f"{ROOT}/resolve/checkpoints", f"{ROOT}/resolve")
  finally:
    paths.rmtree(f"{ROOT}/resolve")
  from nanbeige_jax import eval as ev
  from nanbeige_jax.refine.models import LocalChatModel
  with pytest.raises(ValueError, match="tokenizer .*run/tokenizer.model' does not exist"):
    ev._resolve_paths(ev.EvalConfig(workdir=str(tmp_path / "run" / "checkpoints")))  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="tokenizer .*run/tokenizer.model' does not exist"):
    LocalChatModel(str(tmp_path / "run"))


def test_data_root_joins_relative_local_paths_only(tmp_path):
  """``PretrainConfig.data_root`` prefixes relative local source paths; a URI source path is used as given (the old
  ``os.path.join(data_root, 'memory://...')`` made it a local path under data_root)."""
  import types
  from nanbeige_jax.train.pretrain_data import build_sources
  rows = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(30))
  (tmp_path / "local.jsonl").write_text(rows)
  try:
    paths.write_text(f"{ROOT}/data/remote.jsonl", rows)
    cfg = types.SimpleNamespace(data_root=str(tmp_path), skip_bad_lines=False, sources={
        "local": {"kind": "jsonl", "paths": "local.jsonl"},
        "remote": {"kind": "jsonl", "paths": [f"{ROOT}/data/remote.jsonl"]}})
    sources = build_sources(cfg)
    assert sources["local"].split_documents("train") + sources["local"].split_documents("eval")
    assert sorted(sources["remote"].split_documents("train") + sources["remote"].split_documents("eval")) == sorted(
        sources["local"].split_documents("train") + sources["local"].split_documents("eval"))
  finally:
    paths.rmtree(f"{ROOT}/data")
