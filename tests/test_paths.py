"""The path layer on local disk, fsspec's in-memory scheme and an emulated gs:// (an in-memory fsspec filesystem
registered for the gcs protocol: no network): reads, atomic writes, appends, globs; a gs:// directory reaching
orbax unchanged; and every non-orbax writer/reader on a non-local scheme (metrics JSONL + TensorBoard, plots,
tokenizer, data files)."""
import io
import json
import os
import pathlib
import sys

import fsspec  # noqa: F401  (fsspec.registry is loaded)
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from fsspec.implementations.memory import MemoryFileSystem

from nanbeige_jax import paths
from nanbeige_jax.data import sources as S
from nanbeige_jax.data.tokenizer import Tokenizer


class _FakeGcs(MemoryFileSystem):
  """An in-memory filesystem answering the gcs protocol (its own store, ``gs://`` stripped like gcsfs does)."""
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return super()._strip_protocol(path)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """gs:// served by ``_FakeGcs`` through epath's own fsspec backend; the cwd is a fresh directory, so that a path
  wrongly treated as local would show up there as a ``gs:`` folder."""
  monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)  # epath would pick tf.io.gfile
  monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, "gcs", _FakeGcs)  # pylint: disable=protected-access
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  _FakeGcs.store.clear()
  _FakeGcs.pseudo_dirs[:] = [""]
  monkeypatch.chdir(tmp_path)
  yield _FakeGcs.store
  monkeypatch.undo()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  assert not os.path.exists(tmp_path / "gs:")


@pytest.fixture
def memory_root(request):
  root = f"memory://test-{request.node.name.replace('[', '-').replace(']', '')}"
  yield root
  paths.rmtree(root)


# ---- the layer itself -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["local", "memory", "gs"])
def test_read_write_append_glob(scheme, tmp_path, memory_root, request):
  root = {"local": str(tmp_path / "root"), "memory": memory_root}.get(scheme)
  if scheme == "gs":
    request.getfixturevalue("fake_gcs")
    root = "gs://bucket/root"
  paths.write_text(paths.join(root, "a", "x.txt"), "one")
  paths.write_text(paths.join(root, "a", "x.txt"), "two")
  paths.write_bytes(paths.join(root, "b", "y.bin"), b"\x00\x01")
  paths.append_text(paths.join(root, "m.jsonl"), '{"step": 1}\n')
  paths.append_text(paths.join(root, "m.jsonl"), '{"step": 2}\n')
  assert paths.read_text(paths.join(root, "a", "x.txt")) == "two"
  assert paths.read_bytes(paths.join(root, "b", "y.bin")) == b"\x00\x01"
  assert paths.read_text(paths.join(root, "m.jsonl")).splitlines() == ['{"step": 1}', '{"step": 2}']
  assert paths.glob(paths.join(root, "*", "*.txt")) == [paths.join(root, "a", "x.txt")]
  assert paths.glob(paths.join(root, "[ab]", "*")) == [paths.join(root, "a", "x.txt"), paths.join(root, "b", "y.bin")]
  assert paths.is_file(paths.join(root, "a", "x.txt")) and not paths.is_file(paths.join(root, "a"))
  assert paths.is_dir(paths.join(root, "a")) and not paths.exists(paths.join(root, "zz"))
  paths.copy(paths.join(root, "a", "x.txt"), str(tmp_path / "copy" / "x.txt"))
  assert (tmp_path / "copy" / "x.txt").read_text() == "two"
  if scheme == "local":
    assert sorted(os.listdir(tmp_path / "root" / "a")) == ["x.txt"]  # no temporary file left
  else:
    assert paths.join(root, "a").startswith(f"{paths.scheme(root)}://")


def test_local_write_is_atomic_and_cleans_up_on_failure(tmp_path):
  target = tmp_path / "t"
  target.mkdir()  # replacing a directory by a file fails after the data was written to the temporary file
  with pytest.raises(OSError):
    paths.write_text(str(target), "new")
  assert target.is_dir() and os.listdir(tmp_path) == ["t"]


def test_scheme_errors():
  with pytest.raises(ValueError, match="unknown scheme 'zz'"):
    paths.as_path("zz://bucket/x")
  with pytest.raises(ValueError, match="local paths only"):
    paths.glob("memory://bucket/**/x")


def test_gs_directory_reaches_orbax_unchanged(fake_gcs, tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.path import gcs_utils
  # orbax asks the GCS API (google-cloud-storage) whether the bucket has a hierarchical namespace: the emulated
  # bucket has a flat one. Reaching this question at all shows orbax took the directory as a gs:// bucket.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  # What checkpoint.py did: pathlib turns the URI into a local folder named 'gs:'.
  old = pathlib.Path("gs://bucket/run/checkpoints").expanduser().absolute()
  assert str(old) == str(tmp_path / "gs:" / "bucket" / "run" / "checkpoints")
  directory = paths.orbax_directory("gs://bucket/run/checkpoints")
  assert os.fspath(directory) == "gs://bucket/run/checkpoints"
  assert os.fspath(paths.orbax_directory("rel/ckpt")) == str(tmp_path / "rel" / "ckpt")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))
  assert os.fspath(manager.directory) == "gs://bucket/run/checkpoints"
  manager.save(3, args=ocp.args.Composite(meta=ocp.args.JsonSave({"step": 3})))
  manager.wait_until_finished()
  assert manager.all_steps() == [3]
  assert any(key.startswith("/bucket/run/checkpoints/3/meta") for key in fake_gcs)
  restored = ocp.CheckpointManager(paths.orbax_directory("gs://bucket/run/checkpoints"))
  assert restored.restore(3, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] == {"step": 3}


# ---- writers and readers on non-local schemes -----------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["memory", "gs"])
def test_metrics_writer_stages_and_syncs(scheme, memory_root, request):
  from nanbeige_jax.metrics import MetricsWriter, read_metrics
  if scheme == "gs":
    request.getfixturevalue("fake_gcs")
  workdir = f"{memory_root}/run" if scheme == "memory" else "gs://bucket/run"
  writer = MetricsWriter(workdir, enabled=True, sync_every_s=0.0)
  writer.write(1, {"loss": np.float32(2.5), "lr": 1e-3})
  assert [r["step"] for r in read_metrics(f"{workdir}/metrics.jsonl")] == [1]  # synced at the write
  writer.write(2, {"loss": 2.0, "lr": 1e-3})
  writer.close()
  events = paths.glob(f"{workdir}/tb/events.out.tfevents.*")
  assert len(events) == 1 and paths.size(events[0]) > 0
  resumed = MetricsWriter(workdir, enabled=True, sync_every_s=3600.0)  # a resumed run appends
  resumed.write(3, {"loss": 1.5})
  assert [r["step"] for r in read_metrics(f"{workdir}/metrics.jsonl")] == [1, 2]  # not synced yet
  resumed.close()
  rows = read_metrics(f"{workdir}/metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, 2.0), (3, 1.5)]


def test_plot_run_on_memory(memory_root):
  from nanbeige_jax.plot import plot_run
  rows = [{"step": s, "tokens_seen": s * 1000, "loss": 3.0 - s * 0.1, "lr": 1e-3, "phase": "stable",
           "mixture/web": 0.7, "mixture/code": 0.3} for s in range(1, 6)]
  paths.write_text(f"{memory_root}/run/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  out = plot_run(f"{memory_root}/run/metrics.jsonl", f"{memory_root}/run/run.png")
  assert out == f"{memory_root}/run/run.png"
  assert paths.read_bytes(out)[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokenizer_load_from_memory(memory_root, tmp_path):
  tokenizer = Tokenizer.train(["the sun and the moon", "a star in the sky"] * 40, tmp_path / "tok", 290)
  paths.copy(str(tmp_path / "tok.model"), f"{memory_root}/tok/tokenizer.model")
  for where in (f"{memory_root}/tok", f"{memory_root}/tok/tokenizer.model"):
    loaded = Tokenizer.load(where)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert loaded.source == f"{memory_root}/tok/tokenizer.model"
  with pytest.raises(ValueError, match="does not exist"):
    Tokenizer.load(f"{memory_root}/missing.model")


def test_data_files_on_memory(memory_root, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  for part in range(2):
    paths.write_text(f"{memory_root}/data/j-{part}.jsonl",
                     "".join(json.dumps({"text": f"doc {part}-{i}"}) + "\n" for i in range(3)))
  paths.write_text(f"{memory_root}/data/t.txt", "first block\n\nsecond block\n")
  buffer = io.BytesIO()
  pq.write_table(pa.table({"text": ["p0", "p1"]}), buffer)
  paths.write_bytes(f"{memory_root}/data/p.parquet", buffer.getvalue())
  jsonl = S.JsonlSource("j", f"{memory_root}/data/j-*.jsonl")
  assert jsonl.paths == [f"{memory_root}/data/j-0.jsonl", f"{memory_root}/data/j-1.jsonl"]
  assert [jsonl.document(i) for i in range(6)] == [f"doc {p}-{i}" for p in range(2) for i in range(3)]
  text = S.TextFileSource("t", f"{memory_root}/data/t.txt", doc_per="blank_line")
  assert [text.document(i) for i in range(2)] == ["first block", "second block"]
  parquet = S.ParquetSource("p", f"{memory_root}/data/*.parquet")
  assert [parquet.document(i) for i in range(2)] == ["p0", "p1"]
  with pytest.raises(ValueError, match="no file matches"):
    S.JsonlSource("x", f"{memory_root}/data/none-*.jsonl")


def test_gin_file_on_memory(memory_root):
  from nanbeige_jax.config import ConfigError, build, parse_gin
  from nanbeige_jax.data.prepare import PrepareConfig
  paths.write_text(f"{memory_root}/prep.gin", "PrepareConfig.sources = {'a': {'kind': 'jsonl', 'paths': 'x'}}\n"
                   "PrepareConfig.tokenizer_path = 't.model'\nPrepareConfig.output_dir = 'gs://b/out'\n")
  parse_gin([f"{memory_root}/prep.gin"], ["PrepareConfig.num_workers = 3"])
  config = build(PrepareConfig)
  assert (config.output_dir, config.num_workers) == ("gs://b/out", 3)
  with pytest.raises(ConfigError, match="gin file not found"):
    parse_gin([f"{memory_root}/missing.gin"])
