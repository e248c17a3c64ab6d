"""Checkpoint layer: round-trips (params, optax state, data state, metadata), resharding between a 1-device and an
8-device mesh, params-only hand-off, async save + pruning, atomicity, corruption and strict-target errors."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nanbeige_jax import checkpoint as ck
from nanbeige_jax.model import abstract_model, get_preset
from nanbeige_jax.sharding import logical_axes_tree, single_device_mesh, tree_shardings

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
  """A tiny model's params and an adamw state after one update (so mu, nu and count are all non-trivial)."""
  cfg = get_preset("test")
  abstract_params = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
  rng = np.random.default_rng(0)  # random values (not the model's init) so every leaf differs from every other
  params, grads = [jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), abstract_params)
                   for _ in range(2)]
  tx = optax.adamw(1e-3, weight_decay=0.1)

  @jax.jit
  def one_step(params, grads):
    updates, opt_state = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = jax.device_get(one_step(params, grads))
  axes = logical_axes_tree(nnx.state(abstract_model(cfg), nnx.Param))
  mesh8 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  return dict(cfg=cfg, tx=tx, params=params, opt_state=opt_state, axes=axes, mesh8=mesh8,
              metadata=ck.build_metadata(cfg, stage="pretrain", tokenizer_fingerprint="tok123",
                                         extra={"lr": 1e-3, "mix": {"web": 0.7}}))


def params_target(setup, mesh):
  shardings = tree_shardings(setup["axes"], mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), setup["params"], shardings)


def assert_bit_equal(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(restored)):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))


def assert_shardings(restored, target):
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert isinstance(got, jax.Array)
    assert got.sharding == want.sharding, (got.sharding, want.sharding)


def test_build_metadata_and_model_check(setup):
  cfg, metadata = setup["cfg"], setup["metadata"]
  assert json.loads(json.dumps(metadata)) == metadata
  assert metadata["format_version"] == ck.FORMAT_VERSION
  assert metadata["model_config"] == cfg.to_dict() and metadata["model_fingerprint"] == cfg.fingerprint()
  assert metadata["stage"] == "pretrain" and metadata["tokenizer_fingerprint"] == "tok123"
  assert metadata["extra"] == {"lr": 1e-3, "mix": {"web": 0.7}}
  assert set(metadata["versions"]) == {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "nanbeige_jax"}
  assert metadata["versions"]["jax"] == jax.__version__ and metadata["versions"]["orbax-checkpoint"] == "0.12.8"
  assert metadata["created_utc"].endswith("+00:00")
  ck.check_model_config(metadata, cfg.replace(scan_layers=False, dtype="bfloat16"))  # compile-time knobs differ
  with pytest.raises(ck.CheckpointError, match=r"hidden_size: checkpoint 64 vs config 128"):
    ck.check_model_config(metadata, cfg.replace(hidden_size=128))
  with pytest.raises(ValueError, match="stage"):
    ck.build_metadata(cfg, stage="")
  with pytest.raises(ValueError, match=r"extra.*/bad.*set"):
    ck.build_metadata(cfg, stage="sft", extra={"bad": {1, 2}})


def test_operative_rope_theta_travels_with_the_metadata(setup):
  """Issue 11 item 1: the base a checkpoint was trained at is recorded, fingerprinted and read back."""
  cfg = setup["cfg"]
  assert cfg.rope_theta == 5e6 and setup["metadata"]["rope_theta"] == 5e6 and setup["metadata"]["phase"] is None
  assert cfg.fingerprint() != cfg.replace(rope_theta=1e6).fingerprint()  # different bases never look identical
  metadata = ck.build_metadata(cfg, stage="pretrain", rope_theta=1e6, phase="stable_2")
  assert (metadata["rope_theta"], metadata["phase"], metadata["model_config"]["rope_theta"]) == (1e6, "stable_2", 1e6)
  assert metadata["model_fingerprint"] == cfg.replace(rope_theta=1e6).fingerprint()
  assert ck.model_config_from_metadata(metadata) == cfg.replace(rope_theta=1e6)
  with pytest.raises(ck.CheckpointError, match=r"rope_theta: checkpoint 1000000.0 vs config 5000000.0"):
    ck.check_model_config(metadata, cfg)
  ck.check_model_config(metadata, cfg, rope_theta=1e6)  # a resume into the 1e6 phase expects 1e6
  # A checkpoint of an older version: no rope_theta entry, a fingerprint without the base: still matches.
  old = {k: v for k, v in setup["metadata"].items() if k not in ("rope_theta", "phase")}
  old["model_fingerprint"] = "0123456789abcdef"
  assert ck.model_config_from_metadata(old) == cfg
  ck.check_model_config(old, cfg)
  with pytest.raises(ValueError, match="rope_theta"):
    ck.build_metadata(cfg, stage="sft", rope_theta=1.0)
  with pytest.raises(ck.CheckpointError, match="no model_config"):
    ck.model_config_from_metadata({"format_version": 1})


def test_roundtrip_one_device_then_onto_8_device_mesh(setup, tmp_path):
  mesh1 = single_device_mesh()
  target1 = params_target(setup, mesh1)
  params1 = jax.device_put(setup["params"], jax.tree.map(lambda t: t.sharding, target1))
  opt1 = jax.device_put(setup["opt_state"], jax.devices()[0])
  data_state = {"next_index": 12, "sources": {"web": {"next_index": 7, "epoch": 1}}, "order": [3, 1, 2]}
  with ck.CheckpointManager(tmp_path) as manager:
    manager.save(10, params=params1, opt_state=opt1, metadata=setup["metadata"], data_state=data_state)
    manager.wait_until_finished()
    assert manager.latest_step() == 10 and manager.all_steps() == [10]
    assert sorted(p.name for p in (tmp_path / "10").iterdir() if p.is_dir()) == [
        "checksums", "data_state", "metadata", "opt_state", "params"]

    # Same (1-device) layout, optimizer target from jax.eval_shape of the optimizer init: exact structure back.
    opt_target1 = ck.opt_state_target(setup["tx"], target1)
    assert jax.tree.structure(opt_target1) == jax.tree.structure(jax.eval_shape(setup["tx"].init, setup["params"]))
    restored = manager.restore(params_target=target1, opt_state_target=opt_target1)
    assert restored.step == 10
    assert_bit_equal(restored.params, setup["params"])
    assert_bit_equal(restored.opt_state, setup["opt_state"])
    assert type(restored.opt_state[0]).__name__ == "ScaleByAdamState" and int(restored.opt_state[0].count) == 1
    assert_shardings(restored.params, target1)
    assert_shardings(restored.opt_state, opt_target1)
    assert restored.data_state == data_state and restored.metadata == setup["metadata"]
    assert manager.read_metadata(10) == setup["metadata"]

    # Onto the 8-device (data=2, fsdp=4) mesh with logical-axis shardings.
    target8 = params_target(setup, setup["mesh8"])
    opt_target8 = ck.opt_state_target(setup["tx"], target8)
    restored8 = manager.restore(10, params_target=target8, opt_state_target=opt_target8)
    assert_bit_equal(restored8.params, setup["params"])
    assert_bit_equal(restored8.opt_state, setup["opt_state"])
    assert_shardings(restored8.params, target8)
    assert_shardings(restored8.opt_state, opt_target8)
    embed = restored8.params["embed"]
    assert embed.sharding.spec == PartitionSpec(None, "fsdp") and len(embed.sharding.device_set) == 8
    assert embed.addressable_shards[0].data.shape == (256, 16)  # really split over fsdp=4
    assert restored8.opt_state[0].mu["embed"].sharding.spec == PartitionSpec(None, "fsdp")
    assert restored8.opt_state[0].count.sharding.spec == PartitionSpec()


def test_save_sharded_on_8_devices_restore_on_1(setup, tmp_path):
  target8 = params_target(setup, setup["mesh8"])
  opt_target8 = ck.opt_state_target(setup["tx"], target8)
  params8 = jax.device_put(setup["params"], jax.tree.map(lambda t: t.sharding, target8))
  opt8 = jax.device_put(setup["opt_state"], jax.tree.map(lambda t: t.sharding, opt_target8))
  assert len(params8["layers"]["mlp"]["down"].sharding.device_set) == 8
  with ck.CheckpointManager(tmp_path) as manager:
    manager.save(3, params=params8, opt_state=opt8, metadata=setup["metadata"])
    manager.wait_until_finished()
    target1 = params_target(setup, single_device_mesh())
    opt_target1 = ck.opt_state_target(setup["tx"], target1)
    restored = manager.restore(3, params_target=target1, opt_state_target=opt_target1)
    assert_bit_equal(restored.params, setup["params"])
    assert_bit_equal(restored.opt_state, setup["opt_state"])
    assert_shardings(restored.params, target1)
    assert_shardings(restored.opt_state, opt_target1)
    assert restored.data_state is None

    # No targets: host numpy in the stored structure (namedtuples become lists/dicts).
    host = manager.restore(3)
    assert all(type(x) is np.ndarray for x in jax.tree.leaves(host.params))
    assert_bit_equal(host.params, setup["params"])
    np.testing.assert_array_equal(host.opt_state[0]["mu"]["embed"], np.asarray(setup["opt_state"][0].mu["embed"]))
    assert int(host.opt_state[0]["count"]) == 1

    # Numpy / sharding-less targets restore host arrays with the target's (exact) structure.
    numpy_target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), setup["params"])
    assert all(type(x) is np.ndarray for x in jax.tree.leaves(manager.restore(3, params_target=numpy_target).params))


def test_restore_onto_abstract_mesh_target(setup, tmp_path):
  """nnx.eval_shape under jax.set_mesh gives shardings on an AbstractMesh, which orbax cannot place arrays on."""
  mesh8 = setup["mesh8"]
  ck.save_params_checkpoint(tmp_path, setup["params"], setup["metadata"])
  abstract_target = jax.tree.map(
      lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=NamedSharding(mesh8.abstract_mesh, t.sharding.spec)),
      params_target(setup, mesh8))
  with pytest.raises(ck.CheckpointError, match=r"AbstractMesh.*jax.set_mesh"):
    ck.load_params_checkpoint(tmp_path, target=abstract_target)
  with jax.set_mesh(mesh8):
    params, _ = ck.load_params_checkpoint(tmp_path, target=abstract_target)
  assert params["embed"].sharding == NamedSharding(mesh8, PartitionSpec(None, "fsdp"))
  assert_bit_equal(params, setup["params"])


def test_params_only(setup, tmp_path):
  full_dir, params_dir = tmp_path / "full", tmp_path / "params_only"
  with ck.CheckpointManager(full_dir, async_save=False) as manager:
    manager.save(5, params=setup["params"], opt_state=setup["opt_state"], metadata=setup["metadata"],
                 data_state={"next_index": 3})
    restored = manager.restore(params_only=True)
  assert restored.opt_state is None and restored.data_state is None and restored.step == 5
  assert_bit_equal(restored.params, setup["params"])
  params, metadata = ck.load_params_checkpoint(full_dir, target=params_target(setup, setup["mesh8"]))
  assert_bit_equal(params, setup["params"])
  assert metadata == setup["metadata"]

  ck.save_params_checkpoint(params_dir, setup["params"], setup["metadata"], step=0)
  assert sorted(p.name for p in (params_dir / "0").iterdir() if p.is_dir()) == ["checksums", "metadata", "params"]
  params, metadata = ck.load_params_checkpoint(params_dir)
  assert_bit_equal(params, setup["params"])
  assert metadata == setup["metadata"]
  with ck.CheckpointManager(params_dir, create=False) as manager:
    restored = manager.restore(params_target=params_target(setup, single_device_mesh()))
    assert restored.opt_state is None and restored.data_state is None
    assert_bit_equal(restored.params, setup["params"])
    with pytest.raises(ck.CheckpointError, match=r"params_only/0 has no opt_state"):
      manager.restore(opt_state_target=ck.opt_state_target(setup["tx"], setup["params"]))
  with pytest.raises(ck.CheckpointError, match="does not exist"):
    ck.load_params_checkpoint(tmp_path / "missing")


def test_async_save_and_keep_last_n(setup, tmp_path):
  with ck.CheckpointManager(tmp_path, max_to_keep=2, async_save=True) as manager:
    for step in range(1, 5):
      params = jax.tree.map(lambda x: jax.numpy.asarray(x) + step, setup["params"])
      manager.save(step, params=params, metadata=setup["metadata"], data_state={"next_index": step})
      for leaf in jax.tree.leaves(params):  # the caller may donate/free its buffers once save() returns
        leaf.delete()
    manager.wait_until_finished()
    assert manager.all_steps() == [3, 4] and manager.latest_step() == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
    restored = manager.restore()
    assert restored.step == 4 and restored.data_state == {"next_index": 4}
    assert_bit_equal(restored.params, jax.tree.map(lambda x: np.asarray(x) + np.float32(4), setup["params"]))
    with pytest.raises(ck.CheckpointError, match="step 4 already exists"):
      manager.save(4, params=setup["params"], metadata=setup["metadata"])
    with pytest.raises(ck.CheckpointError, match="a later step 4 exists"):
      manager.save(2, params=setup["params"], metadata=setup["metadata"])
  with ck.CheckpointManager(tmp_path, max_to_keep=None) as reopened:
    assert reopened.all_steps() == [3, 4]
    reopened.delete(4)
    assert reopened.all_steps() == [3]


def test_save_validation(setup, tmp_path):
  with ck.CheckpointManager(tmp_path, async_save=False) as manager:
    with pytest.raises(ValueError, match=r"data_state: key 3 at <root> is int"):
      manager.save(0, params=setup["params"], metadata=setup["metadata"], data_state={3: 1})
    with pytest.raises(ValueError, match=r"metadata: value at /x has type ndarray"):
      manager.save(0, params=setup["params"], metadata={"x": np.zeros(2)})
    with pytest.raises(ValueError, match="non-negative int"):
      manager.save(-1, params=setup["params"], metadata=setup["metadata"])
    with pytest.raises(ck.CheckpointError, match=r"params/embed: cannot save a leaf of type ShapeDtypeStruct"):
      manager.save(0, params=params_target(setup, single_device_mesh()), metadata=setup["metadata"])
    assert manager.all_steps() == [] and list(tmp_path.iterdir()) == []
    with pytest.raises(ck.CheckpointError, match="no committed checkpoint"):
      manager.restore()
  with pytest.raises(ValueError, match="max_to_keep"):
    ck.CheckpointManager(tmp_path, max_to_keep=0)


def test_strict_restore_target_mismatch(setup, tmp_path):
  with ck.CheckpointManager(tmp_path, async_save=False) as manager:
    manager.save(1, params=setup["params"], opt_state=setup["opt_state"], metadata=setup["metadata"])
    target = params_target(setup, single_device_mesh())

    wrong_shape = jax.tree.map(lambda x: x, target)
    wrong_shape["layers"]["attn"]["q_proj"] = jax.ShapeDtypeStruct((2, 64, 8, 24), np.float32)
    with pytest.raises(ck.CheckpointError) as error:
      manager.restore(params_target=wrong_shape)
    assert str(tmp_path / "1" / "params") in str(error.value)
    assert "'layers/attn/q_proj': target expects shape (2, 64, 8, 24), checkpoint has (2, 64, 4, 24)" in str(
        error.value)

    missing = {k: v for k, v in target.items() if k != "lm_head"}  # e.g. a tied-embedding config
    with pytest.raises(ck.CheckpointError, match=r"'lm_head': stored with shape \(64, 256\), absent from the target"):
      manager.restore(params_target=missing)

    extra = dict(target, lm_bias=jax.ShapeDtypeStruct((256,), np.float32))
    with pytest.raises(ck.CheckpointError, match=r"'lm_bias': target expects shape \(256,\), not found"):
      manager.restore(params_target=extra)

    sgd_target = ck.opt_state_target(optax.sgd(0.1, momentum=0.9), target)
    with pytest.raises(ck.CheckpointError, match=r"opt_state.*first mismatch at '0/count'"):
      manager.restore(params_target=target, opt_state_target=sgd_target)


def test_uncommitted_tmp_dir_is_not_a_step(setup, tmp_path):
  with ck.CheckpointManager(tmp_path, async_save=False) as manager:
    manager.save(1, params=setup["params"], metadata=setup["metadata"])
    tmp_dir = tmp_path / f"2{ck.TMP_SUFFIX}"  # what orbax writes into before the atomic rename to "2"
    (tmp_dir / "params").mkdir(parents=True)
    (tmp_dir / "metadata").mkdir()
    (tmp_dir / "metadata" / "metadata").write_text(json.dumps(setup["metadata"]))
    assert manager.all_steps() == [1] and manager.latest_step() == 1
    assert manager.restore(params_only=True).step == 1
    with pytest.raises(ck.CheckpointError, match=r"step 2 at .*/2 is uncommitted"):
      manager.verify_step(2)
    manager.save(2, params=setup["params"], metadata=setup["metadata"])  # a stale tmp dir is replaced
    assert manager.all_steps() == [1, 2] and not tmp_dir.exists()


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    from nanbeige_jax import checkpoint as ck

    async def crash_before_commit(self):
      os._exit(17)  # the process dies after all files are written, before the commit/rename

    manager = ck.CheckpointManager(sys.argv[1], async_save=True)
    params = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}
    manager.save(1, params=params, metadata={"format_version": 1}, data_state={"next_index": 1})
    manager.wait_until_finished()
    atomicity.AtomicRenameTemporaryPath.finalize = crash_before_commit
    atomicity.CommitFileTemporaryPath.finalize = crash_before_commit
    manager.save(2, params={"w": params["w"] + 1, "b": params["b"]}, metadata={"format_version": 1},
                 data_state={"next_index": 2})
    manager.wait_until_finished()
    sys.exit(0)
""")


def test_process_killed_mid_save_leaves_previous_step_latest(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 17, result.stderr[-3000:]
  assert (tmp_path / "1").is_dir() and not (tmp_path / "2").exists()
  assert any(p.name.startswith(f"2{ck.TMP_SUFFIX}") for p in tmp_path.iterdir())
  with ck.CheckpointManager(tmp_path) as manager:
    assert manager.all_steps() == [1] and manager.latest_step() == 1
    restored = manager.restore()
    assert restored.step == 1 and restored.data_state == {"next_index": 1}
    np.testing.assert_array_equal(restored.params["w"], np.arange(12, dtype=np.float32).reshape(3, 4))
    with pytest.raises(ck.CheckpointError, match="uncommitted"):
      manager.restore(2)


@pytest.fixture
def saved_step(setup, tmp_path):
  with ck.CheckpointManager(tmp_path, async_save=False) as manager:
    manager.save(7, params=setup["params"], opt_state=setup["opt_state"], metadata=setup["metadata"],
                 data_state={"next_index": 1})
  return tmp_path, tmp_path / "7"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore's failed reads
def test_truncated_array_data_raises_with_path(setup, saved_step):
  directory, step_dir = saved_step
  data_files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"
                and p.parent.parent.name.startswith("ocdbt.process")]
  assert data_files
  for path in data_files:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with ck.CheckpointManager(directory, create=False) as manager:
    manager.verify_step(7)  # structure is intact; the array bytes are not
    with pytest.raises(ck.CorruptCheckpointError, match=re.escape(f"restoring {step_dir / 'params'} failed")):
      manager.restore(7, params_target=params_target(setup, single_device_mesh()))
    with pytest.raises(ck.CorruptCheckpointError, match=re.escape(f"restoring {step_dir / 'params'} failed")):
      manager.restore(7)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_metadata_and_missing_items(saved_step):
  directory, step_dir = saved_step
  with ck.CheckpointManager(directory, create=False) as manager:
    manager.verify_step(7)
    (step_dir / "metadata" / "metadata").write_text('{"format_version": 1, "model_con')
    with pytest.raises(ck.CheckpointError, match=re.escape(f"{step_dir / 'metadata' / 'metadata'}: unreadable JSON")):
      manager.verify_step(7)
    with pytest.raises(ck.CheckpointError, match="unreadable JSON"):
      manager.restore(7)
    (step_dir / "metadata" / "metadata").write_text('{"format_version": 1}')
    manager.verify_step(7)
    (step_dir / "data_state" / "metadata").write_text("[1, 2]")
    with pytest.raises(ck.CheckpointError, match=r"data_state/metadata: expected a JSON object"):
      manager.verify_step(7)
    (step_dir / "data_state" / "metadata").write_text('{"next_index": 1}')
    (step_dir / "opt_state" / "_METADATA").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match=re.escape(str(step_dir))):
      manager.verify_step(7)
    (step_dir / "params" / "_METADATA").unlink()
    (step_dir / "opt_state" / "_METADATA").unlink()
    with pytest.raises(ck.CheckpointError, match=re.escape(str(step_dir))):
      manager.verify_step(7)
    for path in sorted((step_dir / "params").rglob("*"), reverse=True):
      path.unlink() if path.is_file() else path.rmdir()
    (step_dir / "params").rmdir()
    with pytest.raises(ck.CheckpointError, match=re.escape(f"{step_dir}: incomplete checkpoint, item 'params' is missing")):
      manager.verify_step(7)
    with pytest.raises(ck.CheckpointError, match="item 'params' is missing"):
      manager.restore(7)


MULTI_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    process_id, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import numpy as np
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from nanbeige_jax import checkpoint as ck

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    full = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)

    def put(value, spec):
      return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda index: value[index])

    def target(value, spec):
      return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec))

    params = {"w": put(full, P("data", "fsdp")), "b": put(full[0], P())}
    # count is a host-local scalar jax.Array (what eager optax code produces): the layer must save it as numpy.
    opt_state = {"count": jnp.array(5, jnp.int32), "mu": {"w": put(2 * full, P(None, "fsdp")), "b": put(full[1], P())}}
    manager = ck.CheckpointManager(directory)
    manager.save(1, params=params, opt_state=opt_state, metadata={"format_version": 1}, data_state={"next_index": 4})
    manager.wait_until_finished()
    try:
      manager.save(2, params={"w": jnp.ones((4,))}, metadata={"format_version": 1})
      raise SystemExit("host-local non-scalar array was accepted")
    except ck.CheckpointError as error:
      assert "host-local jax.Array of shape (4,) in a 2-process run" in str(error), error

    restored = manager.restore(
        params_target={"w": target(full, P("fsdp", "data")), "b": target(full[0], P("fsdp"))},
        opt_state_target={"count": target(np.zeros((), np.int32), P()),
                          "mu": {"w": target(full, P("fsdp")), "b": target(full[1], P())}})
    expected = {"params": {"w": full, "b": full[0]}, "opt_state": {"count": np.int32(5), "mu": {"w": 2 * full,
                                                                                               "b": full[1]}}}
    got = {"params": restored.params, "opt_state": restored.opt_state}
    for (path, want), array in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(got)):
      assert not array.is_fully_addressable, path
      for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want)[shard.index], err_msg=str(path))
    assert restored.params["w"].sharding.spec == P("fsdp", "data") and restored.data_state == {"next_index": 4}
    host = manager.restore(1, params_only=True)
    np.testing.assert_array_equal(host.params["w"], full)
    manager.close()
    jax.distributed.shutdown()
    print("MULTI_PROCESS_OK", process_id)
""")


def test_multi_process_save_and_resharded_restore(tmp_path):
  """Two processes x 4 CPU devices (gloo): globally sharded arrays plus a host-local scalar in the optimizer state."""
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-c", MULTI_PROCESS_SCRIPT, str(i), str(port), str(tmp_path / "ckpt")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=180)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i, (proc, output) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0 and f"MULTI_PROCESS_OK {i}" in output, output[-4000:]
