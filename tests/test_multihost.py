"""Multi-host: 2 processes x 4 CPU devices on localhost (gloo) train like one process with 8 devices, and their
checkpoint restores in a single process on another mesh. Also the start-up mode detection of ``distributed``."""
import json
import os
import sys

import jax
import numpy as np
import pytest
from processes import free_port, run_together

import multihost_worker as worker
from nanbeige_jax import distributed
from nanbeige_jax.checkpoint import CheckpointManager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESS_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("multihost")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("JAX_NUM_CPU_DEVICES", None)
  port = free_port()
  outputs = run_together([[sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"), str(i), "2", str(port),
                           str(out)] for i in range(2)], env=env, timeout=PROCESS_TIMEOUT_S)
  assert "process 1/2" in outputs[1]
  return out


@pytest.fixture(scope="module")
def single_process_run():
  assert jax.device_count() == 8 and jax.process_count() == 1
  losses, state, trainer = worker.run_training()
  return losses, jax.tree.map(np.asarray, state.params), trainer


def test_two_processes_match_one_process(two_process_run, single_process_run):
  result = json.loads((two_process_run / "losses.json").read_text())
  assert result["process_count"] == 2
  ref_losses, _, _ = single_process_run
  assert len(result["losses"]) == worker.STEPS
  np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-6)
  assert all(np.isfinite(result["losses"])) and len(set(result["losses"])) == worker.STEPS


def test_two_process_checkpoint_restores_in_one_process(two_process_run, single_process_run):
  _, ref_params, _ = single_process_run
  gathered = np.load(two_process_run / "params.npz")
  # Restore onto a different mesh (pure FSDP over 8 devices) than the one it was saved from.
  trainer = worker.make_trainer({"data": 1, "fsdp": 8, "tensor": 1})
  manager = CheckpointManager(two_process_run / "ckpt", async_save=False, create=False)
  restored = manager.restore(params_target=trainer.abstract_params, opt_state_target=trainer.abstract_opt_state)
  manager.close()
  assert restored.step == worker.STEPS
  assert restored.data_state["next_step"] == worker.STEPS
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(restored.params)[0]}
  assert sorted(flat) == sorted(gathered.files)
  for name, value in flat.items():
    assert value.sharding.mesh.shape["fsdp"] == 8
    np.testing.assert_array_equal(np.asarray(value), gathered[name], err_msg=name)
  # Against the single-process run: the two runs sum the same gradients in a different order (gloo across
  # processes vs in-process), and Adam divides by sqrt(v) + eps, so an element whose gradient nearly cancels
  # (measured: embed[5, 48] with |g| = 1.5e-7 in a row whose median |g| is 4.5e-4, so |g| ~ 15 eps) turns ~1e-10 of
  # rounding into ~1e-6 of parameter. The bound is therefore in units of the largest possible update (lr per
  # step): every parameter agrees to 1e-4 of one step.
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-4 * worker.LR)
  # The optimizer state came back whole: Adam's step count and moments.
  counts = [np.asarray(x) for x in jax.tree.leaves(restored.opt_state) if np.ndim(x) == 0 and
            np.issubdtype(np.asarray(x).dtype, np.integer)]
  assert counts and all(int(c) == worker.STEPS for c in counts)


@pytest.mark.parametrize("env,coordinator,tpu,expected", [
    ({}, None, False, "single"),
    ({}, "10.0.0.1:1234", False, "explicit"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, None, True, "explicit"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
      "SLURM_STEP_NODELIST": "gpu[01-02]"}, None, False, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
      "SLURM_STEP_NODELIST": "gpu01"}, None, False, "single"),  # one task: nothing to coordinate
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
      "SLURM_NODELIST": "gpu[01-02]"}, None, False, "single"),  # the batch script itself, outside srun
    ({"SLURM_JOB_ID": "7"}, None, False, "single"),  # an salloc shell, not an srun step
    ({"TPU_WORKER_HOSTNAMES": "t1,t2"}, None, None, "tpu"),
    ({}, None, True, "tpu"),
])
def test_detect_mode(env, coordinator, tpu, expected):
  assert distributed.detect_mode(env, coordinator, tpu_present=tpu) == expected


def test_initialize_rejects_incomplete_explicit_settings():
  with pytest.raises(ValueError, match="pass both"):
    distributed.initialize("127.0.0.1:1234", num_processes=2)
  with pytest.raises(ValueError, match="outside"):
    distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=2)
  with pytest.raises(ValueError, match="HOST:PORT"):
    distributed.initialize("localhost", num_processes=2, process_id=0)


def test_single_process_initialize_is_a_noop():
  if distributed.detect_mode() != "single":
    pytest.skip(f"this host looks like a {distributed.detect_mode()!r} environment")
  info = distributed.initialize()
  assert info.mode == "single" and info.process_count == 1 and info.global_devices == 8
