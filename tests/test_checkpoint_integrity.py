"""Checkpoint integrity (issue 11 items 3 and 7): per-array checksums verified on restore, fallback past a step whose
bytes were flipped, keep-last-N that counts only read-back steps, storage errors that quarantine nothing, and
checkpoints written before checksums existed."""
from __future__ import annotations

import logging
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanbeige_jax import checkpoint as ck
from nanbeige_jax import checksums
from nanbeige_jax.model import get_preset
from nanbeige_jax.train import resume


def _params(seed: int):
  rng = np.random.default_rng(seed)
  return {"w": rng.standard_normal((64, 96)).astype(np.float32), "b": rng.standard_normal((96,)).astype(np.float32),
          "e": {"table": rng.standard_normal((32, 64)).astype(np.float32)}}


@pytest.fixture(scope="module")
def metadata():
  return ck.build_metadata(get_preset("test"), stage="pretrain")


def _save(manager, step, metadata, tx=None):
  params = _params(step)
  opt_state = None if tx is None else tx.init(params)
  manager.save(step, params=params, opt_state=opt_state, metadata=metadata,
               data_state={"iterator": {"next": step}, "tokens_seen": step * 128})


def flip_params_bytes(step_dir: pathlib.Path, count: int = 64) -> list[pathlib.Path]:
  """The issue's trial: flip ``count`` bytes in the middle of each params data file (the OCDBT data files; the
  b-tree files are covered by tensorstore's own CRC)."""
  files = [p for p in (pathlib.Path(step_dir) / "params").rglob("*") if p.is_file() and p.parent.name == "d"
           and p.parent.parent.name.startswith("ocdbt.process")]
  assert files
  for path in files:
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - count // 2)
    for i in range(start, min(len(data), start + count)):
      data[i] ^= 0xFF
    path.write_bytes(bytes(data))
  return files


def test_checksum_is_layout_independent_and_sensitive():
  rng = np.random.default_rng(0)
  arrays = {"f32": rng.standard_normal((16, 24)).astype(np.float32),
            "bf16": rng.standard_normal((8, 16)).astype(ml_dtypes.bfloat16),
            "i32": rng.integers(-5, 5, (32,)).astype(np.int32), "bool": rng.random((4, 8)) > 0.5,
            "scalar": np.float32(3.5)}
  host = checksums.tree_checksums(arrays)
  for key, value in arrays.items():  # the numpy implementation (8-byte dtypes) agrees with the jitted one
    assert checksums._format(np.asarray(value).dtype, checksums._numpy_leaf(np.asarray(value))) == host[key], key
  wide = {"i64": np.arange(12, dtype=np.int64).reshape(3, 4), "f64": np.linspace(0, 1, 5)}
  wide_sums = checksums.tree_checksums(wide)
  assert wide_sums["i64"].startswith("int64:") and wide_sums["f64"].startswith("float64:")
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  placed = {k: jax.device_put(v, NamedSharding(mesh, P("data", "fsdp") if v.ndim == 2 else P()))
            for k, v in arrays.items()}
  assert checksums.tree_checksums(placed) == host  # 8-way sharded on device == host numpy
  one = {k: jax.device_put(v, jax.devices()[3]) for k, v in arrays.items()}
  assert checksums.tree_checksums(one) == host
  assert host["bf16"].startswith("bfloat16:") and len(host["f32"].split(":")[1]) == 16
  for key in ("f32", "bf16", "i32"):  # one changed bit, or two swapped values, change the checksum
    changed = arrays[key].copy()
    changed.view(np.uint8).reshape(-1)[5] ^= 0x01
    assert checksums.tree_checksums({key: changed})[key] != host[key]
    swapped = arrays[key].copy().reshape(-1)
    swapped[[0, 1]] = swapped[[1, 0]]
    if swapped[0] != swapped[1]:
      assert checksums.tree_checksums({key: swapped.reshape(arrays[key].shape)})[key] != host[key]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flipped_bytes_are_corruption_not_nans(tmp_path, metadata):
  with ck.CheckpointManager(tmp_path, async_save=False, max_to_keep=None) as manager:
    _save(manager, 1, metadata, optax.adam(1e-3))
    restored = manager.restore(1)  # the checksums item verifies a clean round trip (host numpy)
    np.testing.assert_array_equal(restored.params["w"], _params(1)["w"])
    flip_params_bytes(manager.step_dir(1))
    manager.verify_step(1)  # the cheap check reads no array data
    with pytest.raises(ck.CorruptCheckpointError, match=r"params: array data is corrupt: checksum mismatch"):
      manager.restore(1)
    with pytest.raises(ck.CorruptCheckpointError):
      manager.verify_arrays(1)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
                          _params(1))
    with pytest.raises(ck.CorruptCheckpointError, match="checksum mismatch"):
      manager.restore(1, params_target=target, params_only=True)


def test_restore_casts_after_verifying_the_stored_dtype(tmp_path, metadata):
  with ck.CheckpointManager(tmp_path, async_save=False) as manager:
    _save(manager, 1, metadata)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, ml_dtypes.bfloat16,
                                                         sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                          _params(1))
    restored = manager.restore(1, params_target=target, params_only=True)
    assert restored.params["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), _params(1)["w"].astype(ml_dtypes.bfloat16))
    # 64-bit host scalars come back 32-bit in jax.Arrays (x64 off): verified in the dtype they were saved in.
    manager.save(2, params=_params(2), opt_state={"count": 3, "x": np.int64(7)}, metadata=metadata)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"count": jax.ShapeDtypeStruct((), np.int32, sharding=device),
              "x": jax.ShapeDtypeStruct((), np.int32, sharding=device)}
    assert jax.device_get(manager.restore(2, opt_state_target=target).opt_state) == {"count": 3, "x": 7}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_fallback_past_flipped_newest_step(tmp_path, metadata, caplog):
  """The issue's trial: flip 64 bytes in each params data file of the newest step of a run keeping 3."""
  ckpt = tmp_path / "checkpoints"
  with ck.CheckpointManager(ckpt, async_save=False, max_to_keep=None) as manager:
    for step in (49, 56, 63):
      _save(manager, step, metadata)
  flip_params_bytes(ckpt / "63")
  with caplog.at_level(logging.WARNING, logger="nanbeige_jax.resume"):
    manager, restored, moved = resume.restore_with_fallback(
        lambda: ck.CheckpointManager(ckpt, async_save=False, max_to_keep=None, create=False),
        params_target=None, opt_state_target=None)
  try:
    assert restored.step == 56
    np.testing.assert_array_equal(restored.params["w"], _params(56)["w"])
    assert manager.all_steps() == [49, 56]
    assert [p.name.split(".")[0] for p in moved] == ["63"] and moved[0].parent.name == resume.CORRUPT_DIRNAME
    assert f"checkpoint {ckpt / '63'} is unusable" in caplog.text and "checksum mismatch" in caplog.text
    assert f"previous good checkpoint {ckpt / '56'}" in caplog.text
  finally:
    manager.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_keep_last_n_counts_only_read_back_steps(tmp_path, metadata):
  """keep=1 used to delete the only restorable step when the newest one's arrays were corrupt (no data was read)."""
  ckpt = tmp_path / "checkpoints"
  manager = ck.CheckpointManager(ckpt, async_save=False, max_to_keep=None)
  verified: set[int] = set()
  try:
    _save(manager, 1, metadata, optax.adam(1e-3))
    assert resume.prune_checkpoints(manager, keep=1, verified=verified) == [] and verified == {1}
    _save(manager, 2, metadata, optax.adam(1e-3))
    flip_params_bytes(manager.step_dir(2))
    assert resume.prune_checkpoints(manager, keep=1, verified=verified) == []
    assert manager.all_steps() == [1] and verified == {1}
    assert [p.name.split(".")[0] for p in (tmp_path / resume.CORRUPT_DIRNAME).iterdir()] == ["2"]
    _save(manager, 3, metadata, optax.adam(1e-3))
    assert resume.prune_checkpoints(manager, keep=1, verified=verified) == [1]
    assert manager.all_steps() == [3] and verified == {3}
  finally:
    manager.close()


def test_storage_errors_are_not_corruption(tmp_path, metadata, monkeypatch):
  """A transient read failure (permission, network filesystem) must not move the newest step aside."""
  ckpt = tmp_path / "checkpoints"
  with ck.CheckpointManager(ckpt, async_save=False, max_to_keep=None) as manager:
    for step in (1, 2):
      _save(manager, step, metadata)
  flaky = str(ckpt / "2" / "metadata" / "metadata")
  # The checkpoint layer reads through the path layer (epath); patch its local path class and pathlib alike.
  with ck.CheckpointManager(ckpt, create=False) as probe:
    path_classes = {type(probe.step_dir(2)), pathlib.Path}
  for cls in path_classes:
    def failing_read_text(self, *args, _read_text=cls.read_text, **kwargs):  # the filesystem refuses one file
      if str(self) == flaky:
        raise PermissionError(13, "Permission denied", str(self))
      return _read_text(self, *args, **kwargs)
    monkeypatch.setattr(cls, "read_text", failing_read_text)
  with pytest.raises(ck.CheckpointReadError, match="not corruption"):
    ck.CheckpointManager(ckpt, create=False).restore(2)
  open_manager = lambda: ck.CheckpointManager(ckpt, async_save=False, max_to_keep=None, create=False)  # noqa: E731
  with pytest.raises(resume.ResumeError, match=r"cannot restore checkpoint .*/2: .*Permission denied.*nothing was "
                     r"moved aside"):
    resume.restore_with_fallback(open_manager, params_target=None, opt_state_target=None)
  with pytest.raises(resume.ResumeError, match="Permission denied"):
    resume.check_workdir(ckpt, lambda step, meta: None)
  manager = open_manager()
  with pytest.raises(ck.CheckpointReadError):
    resume.prune_checkpoints(manager, keep=1)
  manager.close()
  assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["1", "2"]
  assert not (tmp_path / resume.CORRUPT_DIRNAME).exists()
  assert ck.is_transient(ValueError('UNAVAILABLE: Error reading "x"')) and not ck.is_transient(
      ValueError("DATA_LOSS: CRC-32C checksum verification failed"))


def test_checkpoint_without_checksums_loads_with_a_warning(tmp_path, metadata, caplog):
  with ck.CheckpointManager(tmp_path, async_save=False) as manager:
    _save(manager, 1, metadata)
  shutil.rmtree(tmp_path / "1" / ck.ITEM_CHECKSUMS)  # what a checkpoint of an older version looks like
  with caplog.at_level(logging.WARNING, logger="nanbeige_jax.checkpoint"):
    with ck.CheckpointManager(tmp_path, create=False) as manager:
      restored = manager.restore(1)
  np.testing.assert_array_equal(restored.params["w"], _params(1)["w"])
  assert f"checkpoint {tmp_path / '1' / 'params'} has no stored checksums" in caplog.text
  assert "unverified" in caplog.text
