"""Multi-process start-up: one ``initialize()`` every launcher calls before its first JAX operation.

How the processes of a run find each other, in order of precedence:

* **explicit**: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or the environment variable
  ``JAX_COORDINATOR_ADDRESS`` with the two counts), for hand-started processes, e.g. several CPU processes on one
  machine (gloo collectives) or hosts without a cluster manager;
* **slurm**: inside an ``srun`` step with more than one task (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``,
  ``SLURM_NTASKS`` > 1, ``SLURM_PROCID``, ``SLURM_LOCALID``); ``jax.distributed.initialize()`` takes the
  coordinator (first node of the step), process count and id from them and binds each process to GPU
  ``SLURM_LOCALID``, so launch one task per GPU (``launch/slurm_gpu.sbatch``);
* **tpu**: on a Cloud TPU VM (a TPU device node, ``TPU_WORKER_HOSTNAMES`` or ``TPU_ACCELERATOR_TYPE``);
  ``jax.distributed.initialize()`` with no arguments asks the TPU metadata server (GCE) or reads the GKE
  environment for the workers of the slice;
* **single**: anything else is a single-process run and initialization is a no-op.

``process_local_rows`` tells a data loader which rows of the global batch this process feeds.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
from absl import flags as _absl_flags

from nanbeige_jax import platform

# define_distributed_flags' flags belong to the launcher that calls it (absl's --help lists the main module's flags).
_absl_flags.disclaim_key_flags()

MODES = ("explicit", "slurm", "tpu", "single")


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
  mode: str
  process_index: int
  process_count: int
  local_devices: int
  global_devices: int

  def describe(self) -> str:
    return (f"distributed: mode={self.mode} process {self.process_index}/{self.process_count}, "
            f"{self.local_devices} local / {self.global_devices} global devices")


def _tpu_vm_present(env: Mapping[str, str]) -> bool:
  return platform.tpu_present(env)


def detect_mode(env: Mapping[str, str] | None = None, coordinator_address: str | None = None,
                tpu_present: bool | None = None) -> str:
  """Which start-up applies (one of MODES) given the environment and an explicit coordinator address."""
  env = os.environ if env is None else env
  if coordinator_address or env.get("JAX_COORDINATOR_ADDRESS"):
    return "explicit"
  # The variables jax's SlurmCluster reads; SLURM_STEP_NODELIST exists only inside an srun step.
  slurm_vars = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(v in env for v in slurm_vars) and int(env["SLURM_NTASKS"]) > 1:
    return "slurm"
  if tpu_present if tpu_present is not None else _tpu_vm_present(env):
    return "tpu"
  return "single"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, initialization_timeout: int = 300) -> DistributedInfo:
  """Start the JAX distributed runtime when the run has several processes (see the module docstring).

  Call it before any JAX computation or device query. Safe to call twice (the second call only reports).
  An explicit coordinator needs both ``num_processes`` and ``process_id``; a missing one is a ValueError.
  """
  mode = detect_mode(coordinator_address=coordinator_address)
  if jax.distributed.is_initialized():
    mode = "already-initialized"
  elif mode == "explicit":
    address = coordinator_address or os.environ["JAX_COORDINATOR_ADDRESS"]
    if num_processes is None or process_id is None:
      raise ValueError(f"distributed: coordinator address {address!r} given but num_processes={num_processes} "
                       f"and process_id={process_id}; pass both (--num_processes, --process_id)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"distributed: process_id={process_id} is outside [0, num_processes={num_processes})")
    if ":" not in address:
      raise ValueError(f"distributed: coordinator address {address!r} must be HOST:PORT")
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=initialization_timeout)
  elif num_processes is not None or process_id is not None:
    raise ValueError(f"distributed: num_processes/process_id given without a coordinator address "
                     f"(detected mode {mode!r}); pass --coordinator_address=HOST:PORT as well")
  elif mode in ("slurm", "tpu"):
    jax.distributed.initialize(initialization_timeout=initialization_timeout)
  return DistributedInfo(mode=mode, process_index=jax.process_index(), process_count=jax.process_count(),
                         local_devices=jax.local_device_count(), global_devices=jax.device_count())


def define_distributed_flags(flag_values: Any = None) -> None:
  """Define --coordinator_address, --num_processes and --process_id (idempotent) for absl launchers, as flags of
  the calling module (so the launcher's ``--help`` lists them)."""
  from absl import flags
  flag_values = flags.FLAGS if flag_values is None else flag_values
  if "coordinator_address" in flag_values:
    return
  kw = {"flag_values": flag_values}
  flags.DEFINE_string("coordinator_address", None,
                      "HOST:PORT of process 0's coordinator for hand-started multi-process runs; leave unset on "
                      "TPU pods and under SLURM (auto-detected) and for single-process runs.", **kw)
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).", **kw)
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (with --coordinator_address).",
                       **kw)


def initialize_from_flags() -> DistributedInfo:
  """``initialize`` with the values of ``define_distributed_flags``'s flags."""
  from absl import flags
  f = flags.FLAGS
  return initialize(f.coordinator_address, f.num_processes, f.process_id)


def process_local_rows(sharding: Any, global_batch: int) -> slice:
  """The contiguous rows [start, stop) of a (global_batch, ...) array that this process's devices hold under
  ``sharding`` (what it passes to ``jax.make_array_from_process_local_data``). Raises ValueError when they are
  not contiguous (a mesh whose batch axes interleave processes)."""
  rows: set[int] = set()
  for index in sharding.addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(*index[0].indices(global_batch)))
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {sorted(rows)}")
  return slice(start, stop)
