"""One process of the multi-host test (tests/test_multihost.py), also importable for the single-process reference.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Each process sees 4 CPU devices (the parent sets XLA_FLAGS); together they form the 8-device mesh
data 2 x fsdp 2 x tensor 2. The run: the ``test`` model, the real LM loss (chunked cross-entropy), AdamW, a few
steps on a fixed batch stream of which each process feeds its own rows; then a checkpoint of params + optimizer state.
Process 0 writes ``losses.json`` and ``params.npz`` (the final parameters, gathered) into OUT_DIR.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

STEPS = 3
BATCH, SEQ = 8, 16
LR = 1e-2
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def model_config():
  from nanbeige_jax.model import get_preset
  return get_preset("test", dtype="float32")


def make_optimizer():
  from nanbeige_jax.optim.optimizer import OptimizerConfig, make_optimizer as make
  return make(OptimizerConfig())


def global_batch(step: int) -> dict[str, np.ndarray]:
  cfg = model_config()
  rng = np.random.default_rng(1000 + step)
  tokens = rng.integers(0, cfg.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
  weights = np.ones((BATCH, SEQ), np.float32)
  weights[:, -4:] = rng.random((BATCH, 4)) > 0.5
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": weights,
          "segment_ids": np.ones((BATCH, SEQ), np.int32),
          "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy()}


def make_trainer(mesh_sizes=None):
  import jax
  from nanbeige_jax.sharding import make_mesh
  from nanbeige_jax.objectives.lm import make_lm_loss
  from nanbeige_jax.train.step import Trainer
  mesh = make_mesh(**(mesh_sizes or MESH), devices=jax.devices())
  return Trainer(model_config(), make_optimizer(), make_lm_loss(vocab_chunk=64), mesh=mesh)


def run_training(checkpoint_dir: str | None = None):
  """Train STEPS steps; each process passes only its rows of every global batch. -> (losses, state, trainer)."""
  import jax
  from nanbeige_jax.distributed import process_local_rows
  trainer = make_trainer()
  state = trainer.init_state(seed=0)
  rows = process_local_rows(trainer.batch_sharding(2), BATCH)
  losses = []
  for step in range(STEPS):
    local = {k: v[rows] for k, v in global_batch(step).items()}
    state, metrics = trainer.train_step(state, local, lr=LR, rope_theta=model_config().rope_theta)
    losses.append(float(metrics["loss"]))
  if checkpoint_dir is not None:
    from nanbeige_jax.checkpoint import CheckpointManager, build_metadata
    manager = CheckpointManager(checkpoint_dir, max_to_keep=2, async_save=True)
    manager.save(STEPS, params=state.params, opt_state=state.opt_state,
                 metadata=build_metadata(model_config(), stage="multihost-test"),
                 data_state={"next_step": STEPS, "rows": [rows.start, rows.stop]})
    manager.wait_until_finished()
    manager.close()
  jax.block_until_ready(state)
  return losses, state, trainer


def main(argv: list[str]) -> None:
  process_id, num_processes, port, out_dir = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
  from nanbeige_jax import distributed
  info = distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id, initialization_timeout=60)
  print(info.describe(), flush=True)
  import jax
  from jax.experimental import multihost_utils
  assert info.process_count == num_processes and info.global_devices == 8, info
  losses, state, _ = run_training(os.path.join(out_dir, "ckpt"))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "losses.json"), "w") as f:
      json.dump({"losses": losses, "process_count": jax.process_count()}, f)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(out_dir, "params.npz"), **flat)
  multihost_utils.sync_global_devices("multihost_worker_done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main(sys.argv)
