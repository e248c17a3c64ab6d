"""Sampler consistency: teacher-forced log-probs, transformers greedy parity, left-padding invariance, stop tokens,
max_new_tokens, top-k=1 == greedy, sharded == unsharded, and bad input rejected before compilation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanbeige_jax.generate import (FINISH_EOS, FINISH_LENGTH, Sampler, SamplingConfig, choose_tokens,
                                   policy_logprobs, resolve_stop_tokens, truncate_logits)

MAX_NEW = 12
LOGPROB_ATOL = 1e-4  # fp32 consistency bound of the issue; logits here reach ~10, so rounding is ~1e-5
PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39],
           [7, 8, 9, 10, 200, 201, 202, 3, 4]]


@pytest.fixture(scope="module")
def hf_and_model(tmp_path_factory):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  from nanbeige_jax.hf import load_hf_params
  from nanbeige_jax.model import decoder_from_params
  torch.manual_seed(0)
  hf_cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
                       initializer_range=0.25, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  hf = LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # make the norms matter
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  hf_dir = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(hf_dir)
  cfg, params = load_hf_params(hf_dir, dtype="float32")
  return hf, decoder_from_params(cfg, params)


@pytest.fixture(scope="module")
def sampler(hf_and_model):
  return Sampler(hf_and_model[1], pad_id=0)


@pytest.fixture(scope="module")
def greedy_batch(sampler):
  return sampler.generate(PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0))


SAMPLED = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.7, top_p=0.9, top_k=40)


@pytest.fixture(scope="module")
def sampled_batch(sampler):
  return sampler.generate(PROMPTS, SAMPLED, seeds=[5, 6, 7])


def teacher_forced(model, prompts, generated, temperature):
  """Log-probs of ``generated`` under one plain forward pass (no cache) over prompt + generated, per sample.
  Sequences are right-padded to one length (causal attention: padding after a token cannot affect it)."""
  from flax import nnx
  seqs = [list(p) + list(g) for p, g in zip(prompts, generated)]
  width = max(map(len, seqs))
  full = jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32)
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, full)
  logp = np.asarray(policy_logprobs(logits[:, :-1], full[:, 1:], temperature))
  return [logp[i, len(p) - 1:len(p) - 1 + len(g)] for i, (p, g) in enumerate(zip(prompts, generated))]


def test_greedy_matches_transformers(hf_and_model, greedy_batch):
  import torch
  hf, _ = hf_and_model
  width = max(map(len, PROMPTS))
  ids = torch.zeros((len(PROMPTS), width), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(PROMPTS):  # left padding, as our sampler does
    ids[i, width - len(p):] = torch.tensor(p)
    mask[i, width - len(p):] = 1
  with torch.no_grad():
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                      min_new_tokens=MAX_NEW, pad_token_id=0, eos_token_id=None, output_scores=True,
                      return_dict_in_generate=True)
  hf_tokens = out.sequences[:, width:].numpy()
  # The comparison is meaningful only if no step is a near-tie between the top two logits.
  scores = torch.stack(out.scores, 1)
  top2 = torch.topk(scores, 2, dim=-1).values
  assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-3
  assert greedy_batch.finish_reasons == [FINISH_LENGTH] * 3
  np.testing.assert_array_equal(np.stack(greedy_batch.tokens), hf_tokens)


@pytest.mark.parametrize("which", ["greedy", "sampled"])
def test_logprobs_equal_teacher_forced_pass(hf_and_model, greedy_batch, sampled_batch, which):
  model = hf_and_model[1]
  result, temperature = (greedy_batch, 0.0) if which == "greedy" else (sampled_batch, SAMPLED.temperature)
  for expected, logprobs in zip(teacher_forced(model, PROMPTS, result.tokens, temperature), result.logprobs):
    assert expected.shape == logprobs.shape == (MAX_NEW,)
    assert np.max(np.abs(expected - logprobs)) <= LOGPROB_ATOL
    assert np.all(logprobs <= 0)


def test_left_padding_does_not_change_samples(sampler, greedy_batch, sampled_batch):
  for i in (0, 2):  # shorter prompts, left-padded in the batch by the longest one (same bucket alone: one compile)
    prompt = PROMPTS[i]
    alone = sampler.generate([prompt], SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0))
    np.testing.assert_array_equal(alone.tokens[0], greedy_batch.tokens[i])
    np.testing.assert_allclose(alone.logprobs[0], greedy_batch.logprobs[i], atol=LOGPROB_ATOL, rtol=0)
    alone = sampler.generate([prompt], SAMPLED, seeds=[5 + i])
    assert alone.logprobs[0].shape == (MAX_NEW,)
    np.testing.assert_array_equal(alone.tokens[0], sampled_batch.tokens[i])
    np.testing.assert_allclose(alone.logprobs[0], sampled_batch.logprobs[i], atol=LOGPROB_ATOL, rtol=0)


def test_sampling_is_seeded(sampler, sampled_batch):
  again = sampler.generate(PROMPTS, SAMPLED, seeds=[5, 6, 7])
  np.testing.assert_array_equal(again.token_array, sampled_batch.token_array)
  other = sampler.generate(PROMPTS, SAMPLED, seeds=[50, 60, 70])
  assert not np.array_equal(other.token_array, sampled_batch.token_array)


def test_stop_tokens_and_max_new_tokens(sampler, greedy_batch):
  compiled = len(sampler._compiled)
  stop = int(greedy_batch.tokens[0][3])
  unused = next(t for t in range(3, 256) if all(t not in g for g in greedy_batch.tokens))
  result = sampler.generate(PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0,
                                                    stop_token_ids=(unused, stop)))
  for i, full in enumerate(greedy_batch.tokens):
    hits = np.flatnonzero(full == stop)
    if hits.size:
      n = int(hits[0]) + 1
      assert result.finish_reasons[i] == FINISH_EOS
      assert result.lengths[i] == n and result.tokens[i][-1] == stop
      np.testing.assert_array_equal(result.tokens[i], full[:n])
      np.testing.assert_allclose(result.logprobs[i], greedy_batch.logprobs[i][:n], atol=LOGPROB_ATOL, rtol=0)
      assert np.all(result.token_array[i, n:] == 0) and np.all(result.logprob_array[i, n:] == 0)
    else:
      assert result.finish_reasons[i] == FINISH_LENGTH and result.lengths[i] == MAX_NEW
  assert result.finish_reasons[0] == FINISH_EOS and result.lengths[0] <= 4
  assert len(sampler._compiled) == compiled  # stop tokens are data, not a new program


def test_top_k_1_equals_greedy(sampler, greedy_batch):
  result = sampler.generate(PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, top_k=1), seeds=9)
  np.testing.assert_array_equal(result.token_array, greedy_batch.token_array)
  # at temperature 1 the reported log-probs are the unmodified model's, like greedy's
  np.testing.assert_allclose(result.logprob_array, greedy_batch.logprob_array, atol=LOGPROB_ATOL, rtol=0)


def test_truncation_keeps_top_k_and_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]], jnp.float32))
  def kept(x):
    return np.flatnonzero(np.isfinite(np.asarray(x[0]))).tolist()
  assert kept(truncate_logits(logits, 2, 1.0)) == [0, 1]
  assert kept(truncate_logits(logits, 0, 1.0)) == [0, 1, 2, 3, 4]
  assert kept(truncate_logits(logits, 0, 0.6)) == [0, 1]   # mass before token 1 is 0.5 < 0.6, before token 2 0.7
  assert kept(truncate_logits(logits, 0, 0.75)) == [0, 1, 2]
  assert kept(truncate_logits(logits, 0, 0.1)) == [0]
  assert kept(truncate_logits(logits, 1, 1.0)) == [0]
  assert kept(truncate_logits(logits, 3, 0.95)) == [0, 1, 2]  # nucleus of the top-3 distribution (0.85 mass)
  assert kept(truncate_logits(logits, 4, 0.8)) == [0, 1, 2]   # renormalised: 0.5/0.95 + 0.2/0.95 < 0.8
  # Sampled tokens stay inside the nucleus and follow its renormalised probabilities.
  rows = jnp.broadcast_to(logits, (4000, 5))
  keys = jax.random.split(jax.random.key(0), 4000)
  choose = jax.jit(functools.partial(choose_tokens, truncate=True))
  tokens, logp = choose(keys, rows, jnp.float32(1.0), jnp.float32(0.75), jnp.int32(0), jnp.bool_(False))
  counts = np.bincount(np.asarray(tokens), minlength=5) / 4000
  np.testing.assert_allclose(counts, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.03)
  np.testing.assert_allclose(np.exp(np.asarray(logp)), np.asarray([0.5, 0.2, 0.15, 0.1, 0.05])[np.asarray(tokens)],
                             rtol=1e-5)


def test_sharded_equals_unsharded(hf_and_model, greedy_batch):
  from jax.sharding import Mesh
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  sharded = Sampler(hf_and_model[1], pad_id=0, mesh=mesh)
  assert len(sharded.state["layers"]["attn"]["q_proj"][...].sharding.device_set) == 8
  result = sharded.generate(PROMPTS, SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0))  # batch 3 -> 4
  np.testing.assert_array_equal(result.token_array, greedy_batch.token_array)
  np.testing.assert_allclose(result.logprob_array, greedy_batch.logprob_array, atol=LOGPROB_ATOL, rtol=0)


def test_bad_input_fails_before_compiling(sampler):
  compiled = dict(sampler._compiled)
  greedy = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0)
  with pytest.raises(ValueError, match=r"prompt of 505 tokens \+ max_new_tokens=12 exceeds the cache length 512"):
    sampler.generate([[5] * 505], greedy)
  with pytest.raises(ValueError, match=r"stop_token_ids: \[300\] are outside the model vocabulary"):
    sampler.generate(PROMPTS, greedy.replace(stop_token_ids=(300,)))
  with pytest.raises(ValueError, match="unknown stop token '<\\|im_end\\|>'"):
    resolve_stop_tokens(["<|im_end|>"], {"</s>": 3})
  assert resolve_stop_tokens(["</s>", 7, 3], {"</s>": 3}) == (3, 7)
  with pytest.raises(ValueError, match="prompt 1: expected a non-empty"):
    sampler.generate([[1], []], greedy)
  with pytest.raises(ValueError, match=r"prompt 0: token ids must lie in \[0, 256\)"):
    sampler.generate([[1, 256]], greedy)
  with pytest.raises(TypeError, match="prompt 0: expected a sequence of token ids, found str"):
    sampler.generate(["hello"], greedy)
  with pytest.raises(ValueError, match=r"prompt_length=5 must lie in \[19 \(the longest prompt\), 500"):
    sampler.generate(PROMPTS, greedy, prompt_length=5)
  with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
    sampler.generate(PROMPTS, SAMPLED, seeds=[1, 2])
  for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0),
              dict(temperature=0.0, top_k=5)):
    with pytest.raises(ValueError, match="SamplingConfig"):
      SamplingConfig(**bad)
  assert sampler._compiled == compiled


def test_vocab_limit_forbids_padding_ids_without_changing_logprobs():
  logits = jnp.asarray([[0.0, 1.0, 2.0, 5.0, 6.0]] * 500, jnp.float32)
  keys = jax.random.split(jax.random.key(1), 500)
  for greedy in (True, False):
    choose = jax.jit(functools.partial(choose_tokens, truncate=False, vocab_limit=3))
    tokens, logp = choose(keys, logits, jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0), jnp.bool_(greedy))
    assert int(jnp.max(tokens)) <= 2
    full = jax.nn.log_softmax(logits[0])
    np.testing.assert_allclose(np.asarray(logp), np.asarray(full[tokens]), rtol=1e-6)
  assert int(tokens.min()) < 2 and np.all(np.asarray(tokens) <= 2)  # sampled, not only the argmax
