"""AdamW builder: weight-decay mask on the model's real parameter tree, clipping, and the injected learning rate."""
import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nanbeige_jax.model import Decoder, get_preset
from nanbeige_jax.optim import (OptimizerConfig, get_learning_rate, make_optimizer, param_path_names,
                                set_learning_rate)


@pytest.fixture(scope="module")
def params():
  model = Decoder(get_preset("test"), rngs=nnx.Rngs(0))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def one_update(cfg, params, grads, lr):
  tx = make_optimizer(cfg)

  @jax.jit
  def update(params, grads):
    state = set_learning_rate(tx.init(params), lr)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return update(params, grads)


def flat(tree):
  return {path: leaf for path, leaf in zip(jax.tree.leaves(param_path_names(tree)), jax.tree.leaves(tree))}


def adam_state(state):
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  assert len(found) == 1
  return found[0]


@pytest.mark.parametrize("decay_norms,decay_embeddings,decay_lm_head", [(False, False, True), (True, True, False)])
def test_weight_decay_mask(params, decay_norms, decay_embeddings, decay_lm_head):
  """Zero gradients: the Adam direction is 0, so a parameter moves by exactly -lr * wd * p iff it is decayed."""
  cfg = OptimizerConfig(weight_decay=0.1, decay_norms=decay_norms, decay_embeddings=decay_embeddings,
                        decay_lm_head=decay_lm_head)
  lr = 0.5
  new_params, _ = one_update(cfg, params, jax.tree.map(jnp.zeros_like, params), lr)
  before, after = flat(params), flat(new_params)
  assert {"embed", "lm_head", "final_norm/scale", "layers/input_norm/scale", "layers/attn/q_proj",
          "layers/mlp/down"} <= set(before)
  for path, p in before.items():
    if path.endswith("scale"):
      decayed = decay_norms
    elif path == "embed":
      decayed = decay_embeddings
    elif path == "lm_head":
      decayed = decay_lm_head
    else:
      decayed = True
    want = p * (1 - lr * 0.1) if decayed else p
    np.testing.assert_allclose(after[path], want, rtol=1e-6, err_msg=path)
    assert decayed == (not np.allclose(after[path], p)), path


@pytest.mark.parametrize("clip", [1.0, None, 0.0])
def test_gradient_clipping(params, clip):
  cfg = OptimizerConfig(grad_clip_norm=clip)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  norm = float(optax.global_norm(grads))
  assert norm > 1.0
  _, state = one_update(cfg, params, grads, 1e-3)
  scale = min(1.0, clip / norm) if clip else 1.0
  mu = adam_state(state).mu
  for got, g in zip(jax.tree.leaves(mu), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, (1 - cfg.b1) * g * scale, rtol=1e-5)


def test_set_learning_rate_inside_jit_changes_the_update(params):
  cfg = OptimizerConfig(weight_decay=0.1)
  tx = make_optimizer(cfg)
  grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)), params)

  @jax.jit
  def step(params, state, lr):
    state = set_learning_rate(state, lr)
    updates, state = tx.update(grads, state, params)
    return updates, state

  state0 = tx.init(params)
  small, state_small = step(params, state0, jnp.float32(1e-3))
  large, state_large = step(params, state0, jnp.float32(3e-3))
  assert step._cache_size() == 1  # a new learning rate never retraces
  assert float(get_learning_rate(state_small)) == pytest.approx(1e-3)
  assert float(get_learning_rate(state_large)) == pytest.approx(3e-3)
  for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(large)):
    np.testing.assert_allclose(b, 3 * a, rtol=1e-5, atol=1e-12)
  assert float(optax.global_norm(small)) > 0
  # Works on a state nested in the trainer's own containers, and the stored dtype stays float32.
  nested = set_learning_rate({"opt": (state0,)}, 2e-3)
  assert nested["opt"][0].hyperparams["learning_rate"].dtype == jnp.float32
  assert float(get_learning_rate(nested)) == pytest.approx(2e-3)


def test_set_learning_rate_needs_an_injected_state(params):
  with pytest.raises(ValueError, match="InjectHyperparamsState"):
    set_learning_rate(optax.adamw(1e-3).init(params), 1e-3)


def test_config_validation_and_gin():
  with pytest.raises(ValueError, match="b2"):
    OptimizerConfig(b2=1.0)
  with pytest.raises(ValueError, match="weight_decay"):
    OptimizerConfig(weight_decay=-0.1)
  with pytest.raises(ValueError, match="grad_clip_norm"):
    OptimizerConfig(grad_clip_norm=-1.0)
  with pytest.raises(ValueError, match="no field"):
    OptimizerConfig().replace(weight_decy=0.0)
  cfg = OptimizerConfig()
  assert (cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.grad_clip_norm) == (0.9, 0.95, 1e-8, 0.1, 1.0)
  assert not cfg.decay_norms and not cfg.decay_embeddings and cfg.decay_lm_head
  gin.clear_config()
  try:
    gin.parse_config("nanbeige_jax.optim.OptimizerConfig.weight_decay = 0.05\nOptimizerConfig.grad_clip_norm = None")
    assert dataclasses.astuple(OptimizerConfig())[3:5] == (0.05, None)
  finally:
    gin.clear_config()
