"""The shared train step: sharded equivalence on 8 fake devices, micro-batch invariance, non-finite skipping."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanbeige_jax.model import get_preset
from nanbeige_jax.objectives import Objective
from nanbeige_jax.sharding import make_mesh
from nanbeige_jax.train.step import Trainer

CFG = get_preset("test", dtype="float32")


def dense_loss(model, batch, rope_theta):
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], rope_theta=rope_theta)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  w = batch["loss_weights"]
  return -(logp * w).sum(), w.sum(), {"nll_sum": -(logp * w).sum()}


def objective(loss):
  """A one-term Objective from ``loss(model, batch, rope_theta) -> (sum, weight, sums)``."""
  def fn(model, batch, rope_theta, frozen):
    total, weight, sums = loss(model, batch, rope_theta)
    return {"nll": (total, weight)}, sums
  return Objective(fn, {"nll": 1.0})


def make_batch(b=8, t=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (b, t + 1)).astype(np.int32)
  w = np.ones((b, t), np.float32)
  w[:, -3:] = (rng.random((b, 3)) > 0.5)  # ragged token counts across rows
  seg = np.ones((b, t), np.int32)
  seg[: b // 2, t // 2:] = 2  # packed rows
  pos = np.where(seg == 2, np.arange(t) - t // 2, np.arange(t)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": w, "segment_ids": seg,
          "positions": pos}


def run(mesh_kw, microbatches=1, steps=2):
  """Plain SGD with lr 1: the first update is exactly minus the gradient, so gradients are compared directly
  (Adam would amplify reduction-order noise in near-zero gradients into O(lr) parameter differences)."""
  mesh = make_mesh(**mesh_kw, devices=jax.devices()[: max(1, np.prod([v for v in mesh_kw.values() if v > 0]))])
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  tr = Trainer(CFG, tx, objective(dense_loss), mesh=mesh, microbatches=microbatches)
  state = tr.init_state(seed=0)
  p0 = jax.tree.map(np.asarray, state.params)
  losses, grads = [], None
  for s in range(steps):
    state, m = tr.train_step(state, make_batch(seed=s), lr=1.0, rope_theta=CFG.rope_theta)
    losses.append(float(m["loss"]))
    if s == 0:
      grads = jax.tree.map(lambda a, b: a - np.asarray(b), p0, state.params)
  return losses, grads, m


@pytest.fixture(scope="module")
def reference():
  return run({"data": 1, "fsdp": 1, "tensor": 1})


@pytest.mark.parametrize("mesh_kw", [
    {"data": 8, "fsdp": 1, "tensor": 1},
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 1, "fsdp": 1, "tensor": 4},
])
def test_sharded_step_equals_single_device(reference, mesh_kw):
  ref_losses, ref_grads, _ = reference
  losses, grads, _ = run(mesh_kw)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_microbatches_give_the_same_update(reference):
  ref_losses, ref_grads, _ = reference
  losses, grads, m = run({"data": 1, "fsdp": 1, "tensor": 1}, microbatches=4)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
  assert float(m["tokens"]) == make_batch(seed=1)["loss_weights"].sum()


def test_nonfinite_step_is_skipped_and_counted():
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  tx = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)

  def nan_loss(model, batch, rope_theta):
    l, w, s = dense_loss(model, batch, rope_theta)
    return l * jnp.where(batch["loss_weights"].sum() > 0, jnp.nan, 1.0), w, s
  tr = Trainer(CFG, tx, objective(nan_loss), mesh=mesh)
  state = tr.init_state(seed=0)
  before = jax.tree.map(np.asarray, state.params)
  state, m = tr.train_step(state, make_batch(), lr=1e-2, rope_theta=CFG.rope_theta)
  assert not bool(m["finite"]) and int(state.skipped_steps) == 1 and int(state.bad_streak) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
