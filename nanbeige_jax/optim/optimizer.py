"""AdamW with global-norm clipping and a path-based weight-decay mask, its learning rate injected per step.

The trainer owns the learning rate: it computes ``lr = schedule.lr(tokens)`` (FG-WSD is keyed on tokens, not on optax's
step count) and writes it into the optimizer state before each update:

    tx = make_optimizer(cfg)
    opt_state = tx.init(params)                      # params: pure nested dict (nnx.to_pure_dict(...))
    ...inside the jitted step...
    opt_state = set_learning_rate(opt_state, lr)     # lr: traced float32 scalar
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

``set_learning_rate`` returns a new state (no mutation), keeps the stored dtype (float32) so the step never retraces,
and finds the inject-hyperparams state (``InjectStatefulHyperparamsState`` in optax 0.2.8) anywhere in a tuple/list/dict of states. The value used by an update is the
one set before it; ``get_learning_rate(opt_state)`` reads it back for logging. Weight decay is decoupled (AdamW):
each decayed parameter moves by -lr * weight_decay * p per step in addition to the Adam update.

Gradient accumulation is the trainer's job (sum micro-batch grads, divide by the global token count), so no
``optax.MultiSteps`` here.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax

from nanbeige_jax.config import path_str, strict_replace


@gin.configurable(module="nanbeige_jax.optim")
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW hyper-parameters. ``grad_clip_norm`` None or 0 disables clipping. Decay mask by parameter path: norms
  (leaf named ``scale``) decay only with ``decay_norms``; the token embedding (``embed``) only with
  ``decay_embeddings``; the output head (``lm_head``) is a matmul and decays unless ``decay_lm_head`` is False."""

  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float | None = 1.0
  decay_norms: bool = False
  decay_embeddings: bool = False
  decay_lm_head: bool = True

  def __post_init__(self):
    for name in ("b1", "b2"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"OptimizerConfig.{name}: expected a number in [0, 1), found {value!r}")
    if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
      raise ValueError(f"OptimizerConfig.eps: expected > 0, found {self.eps!r}")
    if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) \
        or not self.weight_decay >= 0:
      raise ValueError(f"OptimizerConfig.weight_decay: expected >= 0, found {self.weight_decay!r}")
    if self.grad_clip_norm is not None and (isinstance(self.grad_clip_norm, bool) or not isinstance(
        self.grad_clip_norm, (int, float)) or not self.grad_clip_norm >= 0):
      raise ValueError(f"OptimizerConfig.grad_clip_norm: expected None or a number >= 0, found {self.grad_clip_norm!r}")
    for name in ("decay_norms", "decay_embeddings", "decay_lm_head"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"OptimizerConfig.{name}: expected a bool, found {getattr(self, name)!r}")

  def replace(self, **changes: Any) -> "OptimizerConfig":
    return strict_replace(self, **changes)


def param_path_names(params: Any) -> Any:
  """Same tree as ``params`` with each leaf replaced by its '/'-joined path, e.g. 'layers/attn/q_proj'."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path_str(path), params)


def decay_mask_fn(cfg: OptimizerConfig):
  """params -> tree of bools: True where weight decay applies."""
  def is_decayed(path: str) -> bool:
    parts = path.split("/")
    if parts[-1] == "scale":
      return cfg.decay_norms
    if parts[0] == "embed":
      return cfg.decay_embeddings
    if parts[0] == "lm_head":
      return cfg.decay_lm_head
    return True

  return lambda params: jax.tree.map(is_decayed, param_path_names(params))


def make_optimizer(cfg: OptimizerConfig, learning_rate: float = 0.0) -> optax.GradientTransformation:
  """clip_by_global_norm (optional) -> AdamW with the decay mask, wrapped in ``optax.inject_hyperparams`` so the
  learning rate lives in the state (set it with ``set_learning_rate`` before each update)."""
  def build(learning_rate):
    adamw = optax.adamw(learning_rate=learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask_fn(cfg))
    if cfg.grad_clip_norm:
      return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    return adamw

  return optax.inject_hyperparams(build, hyperparam_dtype=jnp.float32)(learning_rate=learning_rate)


# optax 0.2.8's inject_hyperparams returns InjectStatefulHyperparamsState, which is not an InjectHyperparamsState.
_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _map_inject_states(state: Any, fn) -> tuple[Any, int]:
  if isinstance(state, _INJECT_STATES):
    return fn(state), 1
  if isinstance(state, dict):
    found, out = 0, {}
    for key, value in state.items():
      out[key], n = _map_inject_states(value, fn)
      found += n
    return out, found
  if isinstance(state, (tuple, list)):
    found, items = 0, []
    for value in state:
      item, n = _map_inject_states(value, fn)
      items.append(item)
      found += n
    if hasattr(state, "_fields"):  # NamedTuple states (e.g. optax chain members)
      return type(state)(*items), found
    return type(state)(items), found
  return state, 0


def set_learning_rate(opt_state: Any, lr: Any) -> Any:
  """New state with the injected learning rate set to ``lr`` (float32 scalar); jit-safe, no retracing."""
  def set_lr(state):
    old = state.hyperparams["learning_rate"]
    return state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.asarray(lr, old.dtype).reshape(
        old.shape)})

  new_state, found = _map_inject_states(opt_state, set_lr)
  if not found:
    raise ValueError("set_learning_rate: no InjectHyperparamsState in the optimizer state; build the optimizer "
                     "with make_optimizer()")
  return new_state


def get_learning_rate(opt_state: Any) -> jnp.ndarray:
  """The learning rate stored in the (first) inject-hyperparams state found in ``opt_state``."""
  found = []

  def grab(state):
    found.append(state.hyperparams["learning_rate"])
    return state

  _map_inject_states(opt_state, grab)
  if not found:
    raise ValueError("get_learning_rate: no InjectHyperparamsState in the optimizer state")
  return found[0]
