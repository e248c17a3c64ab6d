"""The rollout -> update cycle: ``Sampler.set_params`` takes new parameters without recompiling (compilations are
counted across 3 updates) and its outputs follow them; ``RolloutBuffer`` splits one rollout batch into optimizer
minibatches of whole groups."""
import jax
import numpy as np
import pytest
from flax import nnx

from nanbeige_jax.generate import Sampler, SamplingConfig
from nanbeige_jax.model import Decoder, get_preset
from nanbeige_jax.rl.buffer import RolloutBuffer
from nanbeige_jax.sharding import make_mesh

CFG = get_preset("test")
PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23], [7, 8, 9, 10, 200, 201]]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8)
SAMPLED = SamplingConfig(temperature=1.0, max_new_tokens=8)


def params_of(seed):
  return nnx.to_pure_dict(nnx.state(Decoder(CFG, rngs=nnx.Rngs(seed)), nnx.Param))


def compilations(sampler):
  return sum(fn._cache_size() for fns in sampler._compiled.values() for fn in fns)


@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "mesh"])
def test_set_params_follows_new_parameters_without_recompiling(sharded):
  mesh = make_mesh(data=2, fsdp=4, tensor=1) if sharded else None
  sampler = Sampler(Decoder(CFG, rngs=nnx.Rngs(0)), mesh=mesh)
  first = sampler.generate(PROMPTS, SAMPLED, seeds=3)
  count = compilations(sampler)
  assert count >= 3
  outputs = [first.token_array]
  for seed in (1, 2, 3):
    params = jax.tree.map(jax.numpy.asarray, params_of(seed))
    sampler.set_params(params)
    # The caller's arrays may be donated/deleted afterwards (the train step donates its state): set_params copied.
    for leaf in jax.tree.leaves(params):
      leaf.delete()
    got = sampler.generate(PROMPTS, SAMPLED, seeds=3)
    outputs.append(got.token_array)
  # The last update's samples are exactly those of a sampler built from those parameters.
  fresh = Sampler(Decoder(CFG, rngs=nnx.Rngs(3)), mesh=mesh).generate(PROMPTS, SAMPLED, seeds=3)
  np.testing.assert_array_equal(got.token_array, fresh.token_array)
  np.testing.assert_allclose(got.logprob_array, fresh.logprob_array, atol=1e-5)
  assert compilations(sampler) == count  # three updates, no new compilation
  assert len({o.tobytes() for o in outputs}) == 4  # each parameter set gives its own samples


def test_set_params_refuses_another_model():
  sampler = Sampler(Decoder(CFG, rngs=nnx.Rngs(0)))
  other = nnx.to_pure_dict(nnx.state(Decoder(get_preset("test", intermediate_size=64), rngs=nnx.Rngs(0)),
                                     nnx.Param))
  with pytest.raises(ValueError, match="do not match"):
    sampler.set_params(other)


def rollout(groups=6, group_size=4):
  n = groups * group_size
  return {"tokens": np.arange(n * 5).reshape(n, 5), "advantages": np.repeat(np.arange(groups), group_size) * 1.0,
          "group": np.repeat(np.arange(groups), group_size)}


def test_buffer_splits_one_rollout_into_minibatches_of_whole_groups():
  rows = rollout()
  buf = RolloutBuffer(rows, group_size=4)
  minis = list(buf.minibatches(3, epochs=2, seed=5))
  assert len(minis) == 6 and all(m["tokens"].shape == (8, 5) for m in minis)
  for epoch in (minis[:3], minis[3:]):
    seen = np.concatenate([m["tokens"][:, 0] for m in epoch])
    assert sorted(seen) == sorted(rows["tokens"][:, 0])  # every row exactly once per epoch
    for m in epoch:  # whole groups, rows aligned across arrays
      groups = m["group"].reshape(-1, 4)
      assert (groups == groups[:, :1]).all()
      np.testing.assert_array_equal(m["tokens"], rows["tokens"][m["tokens"][:, 0] // 5])
      np.testing.assert_array_equal(m["advantages"], m["group"] * 1.0)
  # Shuffled per epoch from the seed, reproducibly; seed None keeps the order.
  order = [np.concatenate([m["group"][::4] for m in e]).tolist() for e in (minis[:3], minis[3:])]
  assert order[0] != order[1] and order[0] != list(range(6))
  again = list(buf.minibatches(3, epochs=2, seed=5))
  assert all((a["tokens"] == b["tokens"]).all() for a, b in zip(minis, again))
  ordered = list(buf.minibatches(2, seed=None))
  np.testing.assert_array_equal(ordered[0]["tokens"], rows["tokens"][:12])


def test_buffer_refuses_bad_splits():
  with pytest.raises(ValueError, match="whole groups"):
    RolloutBuffer(rollout(), group_size=5)
  with pytest.raises(ValueError, match="disagree"):
    RolloutBuffer({"a": np.zeros((4, 2)), "b": np.zeros((3,))})
  with pytest.raises(ValueError, match="cannot be split into 4"):
    list(RolloutBuffer(rollout(), group_size=4).minibatches(4))


def test_rollout_update_cycle_through_the_loop(tmp_path):
  """``next_inputs(step, state)`` samples with the current parameters (``set_params`` copies them before the step
  donates the state), the buffer turns the rollout into the step's batch; nothing recompiles across steps."""
  import optax

  from nanbeige_jax.checkpoint import build_metadata
  from nanbeige_jax.metrics import MetricsWriter, Progress
  from nanbeige_jax.objectives import make_lm_loss
  from nanbeige_jax.train.checkpointing import Checkpointer
  from nanbeige_jax.train.loop import LoopSettings, StepInputs, train_loop
  from nanbeige_jax.train.step import Trainer
  trainer = Trainer(CFG, optax.inject_hyperparams(optax.sgd)(learning_rate=1.0), make_lm_loss(vocab_chunk=256),
                    mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  sampler = Sampler(Decoder(CFG, rngs=nnx.Rngs(0)))
  seen = []

  def next_inputs(step, state):
    sampler.set_params(state.params)
    out = sampler.generate([PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]], SAMPLED, seeds=0)
    seen.append((compilations(sampler), out.token_array))
    tokens = out.token_array
    t = tokens.shape[1] - 1
    rows = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": np.ones((4, t), np.float32),
            "segment_ids": np.ones((4, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (4, 1))}
    (batch,) = RolloutBuffer(rows, group_size=2).minibatches(1, seed=step)
    return StepInputs(batch=batch, lr=2.0, rope_theta=CFG.rope_theta, tokens=4 * t, seq_len=t)
  ckpt = Checkpointer(tmp_path / "checkpoints", metadata=build_metadata(CFG, stage="t"),
                      data_state_fn=lambda: {"iterator": {}}, async_save=False)
  try:
    result = train_loop(trainer, trainer.init_state(0), start_step=0,
                        settings=LoopSettings(total_steps=3, log_every=1, eval_every=100, checkpoint_every=100),
                        next_inputs=next_inputs, checkpointer=ckpt, writer=MetricsWriter(tmp_path),
                        progress=Progress(3))
  finally:
    ckpt.close()
  assert result.step == 3 and result.stop_reason is None
  assert seen[0][0] == seen[1][0] == seen[2][0]  # one compilation, three parameter sets
  assert not np.array_equal(seen[0][1], seen[2][1])  # the samples follow the updated policy (same seeds)
