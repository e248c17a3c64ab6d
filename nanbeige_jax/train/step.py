"""The jitted train step every trainer uses (pre-training, SFT; DPD and RL next).

``Trainer(model_cfg, tx, objective, *, mesh, rules, microbatches, frozen_configs={role: ModelConfig})`` owns the
sharded, jitted train and eval steps for a policy model, an optax optimizer and an ``Objective``
(``nanbeige_jax.objectives``), plus any number of *frozen* models (reference, teacher, reward model):

* **Frozen models** are passed to the step as non-donated arguments ``frozen={role: params}`` with their own
  ``NamedSharding``s from the same logical rules (``frozen_shardings[role]``); their graph definitions come from
  their own configs (a teacher can be a bigger preset sharing the vocabulary). They are never closed over, so
  their weights are neither trace-time constants nor outside ``in_shardings``. No gradient flows into them.
* **Several loss terms, each with its own divisor**: the objective returns ``{term: (sum, weight)}`` per
  micro-batch; the step minimises ``sum_t c_t * S_t / W_t`` where ``S_t``/``W_t`` are the sums over the *whole global
  batch* (all micro-batches, all devices). That keeps the update identical under any split into micro-batches
  (gradient accumulation) or devices (data parallelism). The gradient of the first non-zero term (the *reference*)
  is accumulated unscaled and divided once by ``W_ref / c_ref`` at the end (bit-identical to a single-term trainer);
  the other terms enter scaled by ``(c_t / W_t) / (c_ref / W_ref)``, with the global weights taken from the objective
  evaluated on the whole batch (weights depend on the batch's masks only; the forward that computes them is dead
  code and removed by the compiler).
* Metrics: ``loss`` (the objective's ``loss_term`` mean), ``objective`` (the total), ``terms`` (every term's
  mean), ``weights`` (every term's global weight), ``tokens`` (the reference term's weight), ``grad_norm``,
  ``finite`` and the objective's extra ``sums``.

The step is ``jax.jit`` with explicit ``in_shardings``/``out_shardings`` and donates the old state. Non-finite steps
are skipped and counted. ``check_batch_split`` is the one check that a (micro-)batch divides over the devices that
shard the ``batch`` logical axis (else it would be silently replicated); the trainer and ``nanbeige_jax.aot`` use it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nanbeige_jax.model import Decoder, ModelConfig, abstract_model
from nanbeige_jax.objectives.base import Objective
from nanbeige_jax.optim.optimizer import set_learning_rate
from nanbeige_jax.sharding import (DEFAULT_RULES, Rules, logical_axes_tree, logical_to_spec, tree_shardings,
                                   use_mesh_rules, with_logical_constraint)
from nanbeige_jax.train.state import TrainState


def batch_devices(mesh: Mesh, rules: Rules) -> int:
  """How many shards the ``batch`` logical axis is split into on ``mesh`` (product of the mesh axes it maps to)."""
  entry = logical_to_spec(("batch",), rules, mesh)
  entry = entry[0] if len(entry) else None
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(mesh.shape[a] for a in axes)


def check_batch_split(global_batch: int, microbatches: int, mesh: Mesh, rules: Rules, *, what: str = "global batch"
                      ) -> None:
  """ValueError unless ``global_batch`` splits into ``microbatches`` micro-batches whose rows divide over the
  devices sharding the ``batch`` axis (data x fsdp x dcn_* of the mesh): a micro-batch that does not divide would be
  replicated on every device, silently multiplying the work."""
  if microbatches <= 0 or global_batch % microbatches:
    raise ValueError(f"{what} of {global_batch} rows is not divisible by microbatches={microbatches}")
  shards = batch_devices(mesh, rules)
  if (global_batch // microbatches) % shards:
    raise ValueError(f"micro-batch of {global_batch // microbatches} rows ({what} {global_batch} / microbatches "
                     f"{microbatches}) cannot be split over the {shards} batch shards of mesh {dict(mesh.shape)}; "
                     f"make it a multiple of {shards}")


class _Sharded:
  """Graph definition, logical axes, shardings and abstract shapes of one model's parameters on a mesh."""

  def __init__(self, cfg: ModelConfig, mesh: Mesh, rules: Rules):
    abstract = abstract_model(cfg)
    self.graphdef = nnx.graphdef(abstract)
    state = nnx.state(abstract, nnx.Param)
    self.axes = logical_axes_tree(state)
    shapes = nnx.to_pure_dict(state)
    self.shardings = tree_shardings(self.axes, mesh, rules, shapes)
    self.abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                                 self.shardings)


class Trainer:
  def __init__(self, model_cfg: ModelConfig, tx: optax.GradientTransformation, objective: Objective, *,
               mesh: Mesh, rules: Rules = DEFAULT_RULES, microbatches: int = 1, donate: bool = True,
               frozen_configs: Mapping[str, ModelConfig] | None = None):
    if not isinstance(objective, Objective):
      raise TypeError(f"Trainer: expected an Objective (nanbeige_jax.objectives), found {type(objective).__name__}")
    self.cfg, self.tx, self.objective = model_cfg, tx, objective
    self.mesh, self.rules, self.microbatches = mesh, tuple(rules), microbatches
    policy = _Sharded(model_cfg, mesh, self.rules)
    self.graphdef, self.param_axes = policy.graphdef, policy.axes
    self.param_shardings, self.abstract_params = policy.shardings, policy.abstract
    self.frozen_configs = dict(frozen_configs or {})
    missing = sorted(set(objective.frozen_roles) - set(self.frozen_configs))
    if missing:
      raise ValueError(f"Trainer: the objective reads frozen model(s) {missing}; pass their configs in "
                       f"frozen_configs (given: {sorted(self.frozen_configs)})")
    frozen = {role: _Sharded(c, mesh, self.rules) for role, c in self.frozen_configs.items()}
    self.frozen_graphdefs = {r: f.graphdef for r, f in frozen.items()}
    self.frozen_shardings = {r: f.shardings for r, f in frozen.items()}
    self.abstract_frozen = {r: f.abstract for r, f in frozen.items()}
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

  def check_batch(self, global_batch: int) -> None:
    check_batch_split(global_batch, self.microbatches, self.mesh, self.rules)

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

  def put_frozen(self, frozen: Mapping[str, Any]) -> dict[str, Any]:
    """Frozen parameters placed in their shardings (``{role: params}``; every configured role required)."""
    if set(frozen) != set(self.frozen_configs):
      raise ValueError(f"frozen parameters for roles {sorted(frozen)}, the trainer has {sorted(self.frozen_configs)}")
    return {r: jax.device_put(p, self.frozen_shardings[r]) for r, p in frozen.items()}

  def model(self, params: Any) -> Decoder:
    return nnx.merge(self.graphdef, params)

  def frozen_models(self, frozen: Mapping[str, Any]) -> dict[str, Decoder]:
    return {r: nnx.merge(self.frozen_graphdefs[r], jax.lax.stop_gradient(p)) for r, p in frozen.items()}

  # --- steps --------------------------------------------------------------------------------------------------
  def _split(self, batch):
    m = self.microbatches

    def split(x):
      b = x.shape[0]
      if b % m:
        raise ValueError(f"global batch {b} is not divisible by microbatches={m}")
      # Strided split keeps every device's rows local: micro-batch j holds rows j, j+m, ...
      return x.reshape((b // m, m) + x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)

  def _grads(self, params, batch, rope_theta, frozen):
    """Accumulated (reference-scaled objective, terms, sums, gradients) over micro-batches."""
    obj = self.objective
    ref = obj.reference_term
    frozen_models = self.frozen_models(frozen)
    scales = {}
    if len(obj.coefficients) > 1:  # the other terms' scale needs the global weights before the backward pass
      full_terms, _ = obj(self.model(params), batch, rope_theta, frozen_models)
      w_ref = jnp.maximum(jax.lax.stop_gradient(full_terms[ref][1]), 1.0)
      for t, c in obj.coefficients.items():
        if t != ref:
          w_t = jnp.maximum(jax.lax.stop_gradient(full_terms[t][1]), 1.0)
          scales[t] = (c / w_t) / (obj.coefficients[ref] / w_ref)

    def micro_loss(p, mb):
      terms, sums = obj(self.model(p), mb, rope_theta, frozen_models)
      total = terms[ref][0]
      for t, s in scales.items():
        total = total + s * terms[t][0]
      return total, (terms, sums)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if self.microbatches == 1:
      (_, (terms, sums)), grads = grad_fn(params, batch)
      return terms, sums, grads
    micro = self._split(batch)

    def body(carry, mb):
      mb = jax.tree.map(lambda x: with_logical_constraint(x, ("batch", "length")[:x.ndim] + (None,) * (x.ndim - 2)),
                        mb)
      (_, (t, s)), g = grad_fn(params, mb)
      return jax.tree.map(jnp.add, carry, (t, s, g)), None

    (_, (t0, s0)), g0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (t0, s0, g0))
    (terms, sums, grads), _ = jax.lax.scan(body, zeros, micro)
    return terms, sums, grads

  def _metrics(self, terms, sums):
    obj = self.objective
    means = {t: s / jnp.maximum(w, 1.0) for t, (s, w) in terms.items()}
    total = sum(obj.coefficients[t] * means[t] for t in means)
    return {"loss": means[obj.logged_term], "objective": total, "terms": means,
            "weights": {t: w for t, (_, w) in terms.items()}, "tokens": terms[obj.reference_term][1], "sums": sums}

  def _train_step(self, state: TrainState, batch, lr, rope_theta, frozen):
    with use_mesh_rules(self.mesh, self.rules):
      terms, sums, grads = self._grads(state.params, batch, rope_theta, frozen)
    ref = self.objective.reference_term
    denom = jnp.maximum(terms[ref][1], 1.0)
    coef = self.objective.coefficients[ref]
    if coef != 1.0:
      denom = denom / coef
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    metrics = self._metrics(terms, sums)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["objective"]) & jnp.isfinite(grad_norm)

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
    return new_state, {**metrics, "grad_norm": grad_norm, "finite": finite}

  def _jit_step(self, batch_sh, donate: bool):
    return jax.jit(self._train_step,
                   in_shardings=(self.state_shardings, batch_sh, self.replicated, self.replicated,
                                 self.frozen_shardings),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,) if donate else ())

  def train_step(self, state: TrainState, batch: dict[str, Any], lr: float, rope_theta: float,
                 frozen: Mapping[str, Any] | None = None):
    """One optimizer update on a global batch (dict of (B, T, ...) arrays). ``frozen``: ``{role: params}`` for
    every configured frozen model (not donated; placed with ``put_frozen`` once, or placed here)."""
    key = tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
    fn = self._train_steps.get(key)
    if fn is None:
      first = next(iter(batch.values()))
      global_rows = first.shape[0] if isinstance(first, jax.Array) and not first.is_fully_addressable else (
          np.shape(first)[0] * jax.process_count())
      self.check_batch(global_rows)
      fn = self._jit_step({k: self.batch_sharding(np.ndim(v)) for k, v in batch.items()}, self._donate)
      self._train_steps[key] = fn
    frozen = self.put_frozen(frozen or {})
    return fn(state, self.put_batch(batch), jnp.float32(lr), jnp.float32(rope_theta), frozen)

  def lower_train_step(self, batch_shapes: dict[str, jax.ShapeDtypeStruct]):
    """Lower the train step from abstract shapes only (AOT compilation, memory analysis, HLO inspection)."""
    batch_sh = {k: self.batch_sharding(len(v.shape)) for k, v in batch_shapes.items()}
    fn = self._jit_step(batch_sh, True)
    scalar_i = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
    abstract_state = TrainState(step=scalar_i, params=self.abstract_params, opt_state=self.abstract_opt_state,
                                skipped_steps=scalar_i, bad_streak=scalar_i)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=self.replicated)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch_shapes.items()}
    return fn.lower(abstract_state, batch, scalar, scalar, self.abstract_frozen)

  def _eval_fn(self, params, batch, rope_theta, frozen):
    with use_mesh_rules(self.mesh, self.rules):
      terms, sums = self.objective(self.model(params), batch, rope_theta, self.frozen_models(frozen))
    ref = self.objective.logged_term
    return {"loss_sum": terms[ref][0], "weight_sum": terms[ref][1], "terms": terms, "sums": sums}

  def eval_step(self, params, batch: dict[str, Any], rope_theta: float, frozen: Mapping[str, Any] | None = None):
    """Summed terms of one host batch: ``loss_sum``/``weight_sum`` (the logged term), ``terms``, ``sums``."""
    if self._eval_step is None:
      self._eval_step = jax.jit(self._eval_fn)
    return self._eval_step(params, self.put_batch(batch), jnp.float32(rope_theta), self.put_frozen(frozen or {}))

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
