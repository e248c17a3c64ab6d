"""The train step of the stage template: frozen models as sharded non-donated arguments (no weights baked into the
program), several loss terms each divided by its own global weight, the LM/SFT gradient checked independently
against ``jax.grad`` of the plainly written mean loss, the logged terms (CE without z-loss), and the one batch-split
check."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nanbeige_jax.model import Decoder, get_preset
from nanbeige_jax.objectives import Objective, make_lm_loss
from nanbeige_jax.sharding import DEFAULT_RULES, logical_axes_tree, make_mesh, tree_shardings
from nanbeige_jax.train.step import Trainer, check_batch_split

CFG = get_preset("test")
TEACHER = get_preset("test", num_layers=3, hidden_size=96, num_heads=4, num_kv_heads=2, intermediate_size=128)
SGD = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)  # first update == minus the gradient


def make_batch(b=16, t=24, seed=0, sft=False):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (b, t + 1)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[: b // 2, t // 2:] = 2  # packed rows
  pos = np.where(seg == 2, np.arange(t) - t // 2, np.arange(t)).astype(np.int32)
  if sft:  # assistant-only weights: very different token counts per row, some rows with none
    start = rng.integers(1, t, (b, 1))
    w = (np.arange(t)[None] >= start).astype(np.float32)
    w[1] = 0.0
  else:
    w = np.ones((b, t), np.float32)
    w[:, -3:] = rng.random((b, 3)) > 0.5
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": w, "segment_ids": seg,
          "positions": pos}


def plain_token_terms(model, batch):
  """Per-token NLL and lse^2 from fully materialised logits (no chunking, no custom VJP)."""
  logits = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]),
                 rope_theta=CFG.rope_theta).astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, -1)
  picked = jnp.take_along_axis(logits, jnp.asarray(batch["targets"])[..., None], -1)[..., 0]
  return lse - picked, jnp.square(lse)


def trainer_gradient(objective, batch, *, mesh_kw, microbatches, frozen_configs=None, frozen=None):
  devices = jax.devices()[: int(np.prod(list(mesh_kw.values())))]
  trainer = Trainer(CFG, SGD, objective, mesh=make_mesh(**mesh_kw, devices=devices), microbatches=microbatches,
                    frozen_configs=frozen_configs)
  state = trainer.init_state(seed=0)
  before = jax.device_get(state.params)
  state, metrics = trainer.train_step(state, batch, 1.0, CFG.rope_theta, frozen)
  grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, jax.device_get(state.params))
  return before, grads, jax.device_get(metrics)


def assert_close_trees(a, b, rtol=2e-4, atol=1e-6):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("sft", [False, True], ids=["lm", "sft"])
def test_gradient_equals_jax_grad_of_the_plain_mean_loss(sft):
  """8-way data parallelism x 2 micro-batches vs ``jax.grad`` of sum(w * nll) / sum(w) over the whole batch."""
  batch = make_batch(sft=sft)
  params, grads, metrics = trainer_gradient(make_lm_loss(vocab_chunk=100), batch,
                                            mesh_kw={"data": 8, "fsdp": 1, "tensor": 1}, microbatches=2)
  graphdef = nnx.graphdef(Decoder(CFG, rngs=nnx.Rngs(0)))
  w = jnp.asarray(batch["loss_weights"])

  def plain_loss(p):
    nll, _ = plain_token_terms(nnx.merge(graphdef, p), batch)
    return jnp.sum(nll * w) / jnp.sum(w)
  loss, expected = jax.value_and_grad(plain_loss)(params)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  assert metrics["tokens"] == batch["loss_weights"].sum()
  assert_close_trees(grads, expected)
  # The test can fail: a per-micro-batch mean (the classic accumulation bug) is outside the tolerance.
  half = {k: v[::2] for k, v in batch.items()}
  _, wrong = jax.value_and_grad(lambda p: 0.5 * plain_loss(p) + 0.0 * jnp.sum(half["loss_weights"]))(params)
  with pytest.raises(AssertionError):
    assert_close_trees(grads, wrong)


def test_terms_have_their_own_divisors_under_accumulation_and_data_parallelism():
  """A token-level term (divided by tokens) and a sequence-level term (divided by sequences with tokens), with
  coefficients 1 and 0.5: the update equals ``jax.grad`` of the plainly written objective, every term is logged."""
  def fn(model, batch, rope_theta, frozen):
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], rope_theta=rope_theta)
    logits = logits.astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    w = batch["loss_weights"]
    seq_mean = jnp.sum(nll * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)
    has = (jnp.sum(w, 1) > 0).astype(jnp.float32)
    return {"tok": (jnp.sum(nll * w), jnp.sum(w)), "seq": (jnp.sum(seq_mean * has), jnp.sum(has))}, {}
  objective = Objective(fn, {"tok": 1.0, "seq": 0.5})
  batch = make_batch(sft=True)
  graphdef = nnx.graphdef(Decoder(CFG, rngs=nnx.Rngs(0)))
  w = jnp.asarray(batch["loss_weights"])

  def plain(p):
    nll, _ = plain_token_terms(nnx.merge(graphdef, p), batch)
    tok = jnp.sum(nll * w) / jnp.sum(w)
    has = jnp.sum(w, 1) > 0
    seq = jnp.sum(jnp.where(has, jnp.sum(nll * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0), 0.0)) / jnp.sum(has)
    return tok + 0.5 * seq, (tok, seq)
  for mesh_kw, micro in [({"data": 8, "fsdp": 1, "tensor": 1}, 2), ({"data": 1, "fsdp": 1, "tensor": 1}, 4)]:
    params, grads, metrics = trainer_gradient(objective, batch, mesh_kw=mesh_kw, microbatches=micro)
    (total, (tok, seq)), expected = jax.value_and_grad(plain, has_aux=True)(params)
    np.testing.assert_allclose(metrics["terms"]["tok"], tok, rtol=1e-5)
    np.testing.assert_allclose(metrics["terms"]["seq"], seq, rtol=1e-5)
    np.testing.assert_allclose(metrics["objective"], total, rtol=1e-5)
    assert metrics["weights"]["seq"] == 15 and metrics["weights"]["tok"] == batch["loss_weights"].sum()
    assert_close_trees(grads, expected)


def test_logged_loss_is_cross_entropy_and_z_loss_is_its_own_term():
  batch = make_batch(b=8)
  params, grads, metrics = trainer_gradient(make_lm_loss(vocab_chunk=100, z_loss_weight=1e-2), batch,
                                            mesh_kw={"data": 8, "fsdp": 1, "tensor": 1}, microbatches=1)
  graphdef = nnx.graphdef(Decoder(CFG, rngs=nnx.Rngs(0)))
  w = jnp.asarray(batch["loss_weights"])

  def plain(p):
    nll, z = plain_token_terms(nnx.merge(graphdef, p), batch)
    ce, zl = jnp.sum(nll * w) / jnp.sum(w), jnp.sum(z * w) / jnp.sum(w)
    return ce + 1e-2 * zl, (ce, zl)
  (total, (ce, zl)), expected = jax.value_and_grad(plain, has_aux=True)(params)
  np.testing.assert_allclose(metrics["loss"], ce, rtol=1e-5)  # CE only: the z-loss is not in `loss`
  np.testing.assert_allclose(metrics["terms"]["z"], zl, rtol=1e-5)
  np.testing.assert_allclose(metrics["objective"], total, rtol=1e-5)
  assert abs(metrics["objective"] - metrics["loss"]) > 1e-3
  assert_close_trees(grads, expected)


def large_constants(hlo_text: str, limit: int = 1024) -> list[str]:
  """StableHLO constants with more than ``limit`` elements."""
  out = []
  for m in re.finditer(r"stablehlo\.constant dense<[^>]*> : tensor<([0-9x]*)x?[a-z]+[0-9]*>", hlo_text):
    dims = [int(d) for d in m.group(1).split("x") if d]
    if int(np.prod(dims)) > limit:
      out.append(m.group(0)[:120])
  return out


def distill_objective():
  def fn(model, batch, rope_theta, frozen):
    teacher = frozen["teacher"]
    s = model(batch["inputs"], batch["positions"], batch["segment_ids"], rope_theta=rope_theta)
    t = teacher(batch["inputs"], batch["positions"], batch["segment_ids"], rope_theta=rope_theta)
    pt = jax.nn.softmax(t.astype(jnp.float32))
    kl = jnp.sum(pt * (jax.nn.log_softmax(t.astype(jnp.float32)) - jax.nn.log_softmax(s.astype(jnp.float32))), -1)
    w = batch["loss_weights"]
    return {"kd": (jnp.sum(kl * w), jnp.sum(w))}, {}
  return Objective(fn, {"kd": 1.0}, frozen_roles=("teacher",))


def test_frozen_teacher_is_a_sharded_argument_not_a_constant():
  """A bigger teacher preset (same vocabulary) as a frozen model: the lowered step holds no large constant, the
  teacher's parameters arrive sharded per the logical rules, are not donated, and get no update."""
  mesh = make_mesh(data=2, fsdp=4, tensor=1)
  trainer = Trainer(CFG, SGD, distill_objective(), mesh=mesh, frozen_configs={"teacher": TEACHER})
  teacher = Decoder(TEACHER, rngs=nnx.Rngs(7))
  teacher_params = nnx.to_pure_dict(nnx.state(teacher, nnx.Param))
  expected = tree_shardings(logical_axes_tree(nnx.state(teacher, nnx.Param)), mesh, DEFAULT_RULES)
  batch = make_batch(b=8)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  lowered = trainer.lower_train_step(shapes)
  assert large_constants(lowered.as_text()) == []
  # The frozen parameters are inputs with the rules' shardings.
  in_shardings = lowered.compile().input_shardings[0][4]["teacher"]
  for (path, got), want, leaf in zip(jax.tree_util.tree_leaves_with_path(in_shardings), jax.tree.leaves(expected),
                                     jax.tree.leaves(teacher_params)):
    assert got.is_equivalent_to(want, leaf.ndim), (jax.tree_util.keystr(path), got, want)
  assert any(len(s.spec) and any(a is not None for a in s.spec) for s in jax.tree.leaves(expected))
  # A real step: the teacher stays alive (not donated) and unchanged; a second step reuses the program.
  frozen = trainer.put_frozen({"teacher": teacher_params})
  state = trainer.init_state(0)
  state, m = trainer.train_step(state, batch, 1e-2, CFG.rope_theta, frozen)
  state, m = trainer.train_step(state, make_batch(b=8, seed=1), 1e-2, CFG.rope_theta, frozen)
  assert np.isfinite(m["loss"]) and float(m["loss"]) > 0
  for a, b in zip(jax.tree.leaves(frozen["teacher"]), jax.tree.leaves(teacher_params)):
    assert not a.is_deleted()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert len(trainer._train_steps) == 1
  # The check can fail: closing over the teacher bakes its weights into the program.
  closed = jax.jit(lambda x: teacher(x, rope_theta=CFG.rope_theta))
  assert large_constants(closed.lower(jnp.zeros((1, 4), jnp.int32)).as_text())
  with pytest.raises(ValueError, match="frozen model"):
    Trainer(CFG, SGD, distill_objective(), mesh=mesh)


def test_batch_that_does_not_divide_over_the_data_axes_is_refused():
  mesh = make_mesh(data=2, fsdp=4, tensor=1)
  check_batch_split(16, 2, mesh, DEFAULT_RULES)
  with pytest.raises(ValueError, match="cannot be split over the 8 batch shards"):
    check_batch_split(12, 1, mesh, DEFAULT_RULES)
  with pytest.raises(ValueError, match="micro-batch of 4 rows .* 8 batch shards"):
    check_batch_split(16, 4, mesh, DEFAULT_RULES)
  trainer = Trainer(CFG, SGD, make_lm_loss(vocab_chunk=100), mesh=mesh, microbatches=2)
  with pytest.raises(ValueError, match="cannot be split over the 8 batch shards"):
    trainer.train_step(trainer.init_state(0), make_batch(b=8), 1e-2, CFG.rope_theta)


def test_a_run_whose_micro_batch_does_not_divide_is_refused_before_writing(tmp_path):
  import gin

  from nanbeige_jax.config import ConfigError, build, parse_gin
  from nanbeige_jax.train.pretrain import PretrainConfig, run_pretrain
  parse_gin(["pretrain/tiny.gin"], ["PretrainConfig.global_batch_size = 8", "PretrainConfig.microbatches = 2",
                                    "PretrainConfig.mesh = {'data': 2, 'fsdp': 4, 'tensor': 1}"])
  cfg = build(PretrainConfig)
  gin.clear_config()
  with pytest.raises(ConfigError, match=r"micro-batch of 4 rows .*8 batch shards"):
    run_pretrain(cfg, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_global_weights_of_a_multi_term_objective_cost_no_extra_forward():
  """The other terms' scales need the global weights before the backward pass; the objective evaluated for them on
  the whole batch is dead code apart from its (mask-only) weights, and the compiler removes it."""
  def fn(model, batch, rope_theta, frozen):
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], rope_theta=rope_theta)
    nll = -jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0]
    w = batch["loss_weights"]
    return {"tok": (jnp.sum(nll * w), jnp.sum(w)), "row": (jnp.sum(nll[:, 0] * w[:, 0]), jnp.sum(w[:, 0]))}, {}

  def flops(objective):
    trainer = Trainer(CFG, SGD, objective, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in make_batch(b=8).items()}
    cost = trainer.lower_train_step(shapes).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]
  one = flops(Objective(lambda *a: ({"tok": fn(*a)[0]["tok"]}, {}), {"tok": 1.0}))
  two = flops(Objective(fn, {"tok": 1.0, "row": 0.5}))
  assert one < two < 1.01 * one  # an extra forward pass would add ~30%
