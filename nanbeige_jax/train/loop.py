"""The one training core every trainer uses (pretrain, SFT, DPD, RL).

A ``Trainer`` owns the sharded, jitted train and eval steps for a model and an optax optimizer. Trainers differ
only in their ``loss_fn(model, batch, rope_theta) -> (loss_sum, weight_sum, sums)``: ``loss_sum`` is summed (not
averaged) over the micro-batch's weighted tokens and ``weight_sum`` is its token count, so the step divides the
summed loss and gradients by the *global* token count of the whole batch. That keeps the update identical under
any split into micro-batches (gradient accumulation) or devices (data parallelism). ``sums`` are extra per-batch
sums (e.g. per-source losses) added up across micro-batches.

The step is ``jax.jit`` with explicit ``in_shardings``/``out_shardings`` (``NamedSharding``s from the logical-axis
rules: the modern spelling of pjit) and donates the old state. Non-finite steps are skipped and counted.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nanbeige_jax.model import Decoder, ModelConfig, abstract_model
from nanbeige_jax.optim.optimizer import set_learning_rate
from nanbeige_jax.sharding import (DEFAULT_RULES, Rules, logical_axes_tree, logical_to_spec, tree_shardings,
                                   use_mesh_rules, with_logical_constraint)
from nanbeige_jax.train.state import TrainState

LossFn = Callable[[Decoder, dict[str, jax.Array], jax.Array], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


class Trainer:
  def __init__(self, model_cfg: ModelConfig, tx: optax.GradientTransformation, loss_fn: LossFn, *,
               mesh: Mesh, rules: Rules = DEFAULT_RULES, microbatches: int = 1, donate: bool = True):
    self.cfg, self.tx, self.loss_fn = model_cfg, tx, loss_fn
    self.mesh, self.rules, self.microbatches = mesh, tuple(rules), microbatches
    abstract = abstract_model(model_cfg)
    self.graphdef = nnx.graphdef(abstract)
    state = nnx.state(abstract, nnx.Param)
    self.param_axes = logical_axes_tree(state)
    shapes = nnx.to_pure_dict(state)
    self.param_shardings = tree_shardings(self.param_axes, mesh, self.rules, shapes)
    self.abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                        shapes, self.param_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    self.replicated = replicated
    abstract_opt = jax.eval_shape(tx.init, self.abstract_params)
    self.opt_shardings = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, self.param_shardings,
                                               transform_non_params=lambda _: replicated)
    self.state_shardings = TrainState(step=replicated, params=self.param_shardings, opt_state=self.opt_shardings,
                                      skipped_steps=replicated, bad_streak=replicated)
    self.abstract_opt_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_opt, self.opt_shardings)
    self._donate = donate
    self._train_steps: dict[Any, Any] = {}
    self._eval_step = None

  # --- state ------------------------------------------------------------------------------------------------
  def batch_sharding(self, ndim: int = 2) -> NamedSharding:
    axes = ("batch", "length", *([None] * max(ndim - 2, 0)))[:ndim]
    return NamedSharding(self.mesh, logical_to_spec(axes, self.rules, self.mesh))

  def init_state(self, seed: int) -> TrainState:
    """Fresh params (initialised directly into their shardings) and optimizer state."""
    cfg, tx = self.cfg, self.tx

    def init():
      model = Decoder(cfg, rngs=nnx.Rngs(seed))
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                        skipped_steps=jnp.zeros((), jnp.int32), bad_streak=jnp.zeros((), jnp.int32))
    return jax.jit(init, out_shardings=self.state_shardings)()

  def state_from(self, step: int, params: Any, opt_state: Any | None, skipped: int = 0) -> TrainState:
    """Assemble a state from restored pieces (a fresh optimizer state when ``opt_state`` is None)."""
    params = jax.device_put(params, self.param_shardings)
    if opt_state is None:
      opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
    put = lambda x: jax.device_put(np.asarray(x, np.int32), self.replicated)
    return TrainState(step=put(step), params=params, opt_state=jax.device_put(opt_state, self.opt_shardings),
                      skipped_steps=put(skipped), bad_streak=put(0))

  def model(self, params: Any) -> Decoder:
    return nnx.merge(self.graphdef, params)

  # --- steps --------------------------------------------------------------------------------------------------
  def _grads(self, params, batch, rope_theta):
    """Summed loss, token count, summed extras and summed gradients over micro-batches."""
    def micro_loss(p, mb):
      loss_sum, weight_sum, sums = self.loss_fn(self.model(p), mb, rope_theta)
      return loss_sum, (weight_sum, sums)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    m = self.microbatches
    if m == 1:
      (loss_sum, (weight_sum, sums)), grads = grad_fn(params, batch)
      return loss_sum, weight_sum, sums, grads

    def split(x):
      b = x.shape[0]
      if b % m:
        raise ValueError(f"global batch {b} is not divisible by microbatches={m}")
      # Strided split keeps every device's rows local: micro-batch j holds rows j, j+m, ...
      x = x.reshape((b // m, m) + x.shape[1:]).swapaxes(0, 1)
      return x
    micro = jax.tree.map(split, batch)

    def body(carry, mb):
      mb = jax.tree.map(lambda x: with_logical_constraint(x, ("batch", "length")[:x.ndim] + (None,) * (x.ndim - 2)),
                        mb)
      (l, (w, s)), g = grad_fn(params, mb)
      acc = jax.tree.map(jnp.add, carry, (l, w, s, g))
      return acc, None

    (l0, (w0, s0)), g0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (l0, w0, s0, g0))
    (loss_sum, weight_sum, sums, grads), _ = jax.lax.scan(body, zeros, micro)
    return loss_sum, weight_sum, sums, grads

  def _train_step(self, state: TrainState, batch, lr, rope_theta):
    with use_mesh_rules(self.mesh, self.rules):
      loss_sum, weight_sum, sums, grads = self._grads(state.params, batch, rope_theta)
    denom = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    loss = loss_sum / denom
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(_):
      opt_state = set_learning_rate(state.opt_state, lr)
      updates, opt_state = self.tx.update(grads, opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state

    def skip(_):
      return state.params, state.opt_state

    params, opt_state = jax.lax.cond(finite, apply, skip, None)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
                              bad_streak=jnp.where(finite, 0, state.bad_streak + 1))
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": weight_sum, "finite": finite, "sums": sums}
    return new_state, metrics

  def train_step(self, state: TrainState, batch: dict[str, Any], lr: float, rope_theta: float):
    """One optimizer update on a global batch (dict of (B, T, ...) arrays)."""
    key = tuple(sorted((k, v.shape) for k, v in batch.items()))
    fn = self._train_steps.get(key)
    if fn is None:
      batch_sh = {k: self.batch_sharding(np.ndim(v)) for k, v in batch.items()}
      fn = jax.jit(self._train_step,
                   in_shardings=(self.state_shardings, batch_sh, self.replicated, self.replicated),
                   out_shardings=(self.state_shardings, self.replicated),
                   donate_argnums=(0,) if self._donate else ())
      self._train_steps[key] = fn
    batch = self.put_batch(batch)
    return fn(state, batch, jnp.float32(lr), jnp.float32(rope_theta))

  def lower_train_step(self, batch_shapes: dict[str, jax.ShapeDtypeStruct]):
    """Lower the train step from abstract shapes only (AOT compilation, memory analysis)."""
    batch_sh = {k: self.batch_sharding(len(v.shape)) for k, v in batch_shapes.items()}
    fn = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_sh, self.replicated, self.replicated),
                 out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated), params=self.abstract_params,
        opt_state=self.abstract_opt_state, skipped_steps=jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated),
        bad_streak=jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=self.replicated)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch_shapes.items()}
    return fn.lower(abstract_state, batch, scalar, scalar)

  def _eval_fn(self, params, batch, rope_theta):
    with use_mesh_rules(self.mesh, self.rules):
      loss_sum, weight_sum, sums = self.loss_fn(self.model(params), batch, rope_theta)
    return {"loss_sum": loss_sum, "weight_sum": weight_sum, "sums": sums}

  def eval_step(self, params, batch: dict[str, Any], rope_theta: float):
    if self._eval_step is None:
      self._eval_step = jax.jit(self._eval_fn)
    return self._eval_step(params, self.put_batch(batch), jnp.float32(rope_theta))

  def put_batch(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """Host batch -> global sharded arrays. Each process passes its own rows (``process_count`` slices)."""
    out = {}
    for k, v in batch.items():
      if isinstance(v, jax.Array) and not v.is_fully_addressable:  # already a global array
        out[k] = v
        continue
      sharding = self.batch_sharding(np.ndim(v))
      if jax.process_count() == 1:
        out[k] = jax.device_put(np.asarray(v), sharding)
      else:
        out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
    return out

