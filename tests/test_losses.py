"""Loss core: chunked log-probs and KL against dense references (values and gradients), z-loss, reductions and
normalisation by the true token count."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanbeige_jax import losses

B, T, D, V = 2, 5, 16, 37  # V = 37 is prime: never a multiple of the chunk


def dense_logprobs(hidden, weight, targets):
  logits = jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32), weight.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], jax.nn.logsumexp(logits, axis=-1)


def dense_kl(s_hidden, s_w, t_hidden, t_w, temperature):
  hp = jax.lax.Precision.HIGHEST
  s = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", s_hidden, s_w, precision=hp) / temperature, axis=-1)
  t = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", t_hidden, t_w, precision=hp) / temperature, axis=-1)
  return jnp.sum(jnp.exp(t) * (t - s), axis=-1)


@pytest.fixture(scope="module")
def data():
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  return {
      "hidden": jax.random.normal(k[0], (B, T, D), jnp.float32),
      "weight": jax.random.normal(k[1], (D, V), jnp.float32) * 0.7,
      "targets": jax.random.randint(k[2], (B, T), 0, V),
      "t_hidden": jax.random.normal(k[3], (B, T, 12), jnp.float32),
      "t_weight": jax.random.normal(k[4], (12, V), jnp.float32) * 0.7,
  }


@pytest.fixture(autouse=True)
def highest_matmul_precision():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.mark.parametrize("chunk", [8, 10, 37, 64])
def test_token_logprobs_match_dense_values_and_grads(data, chunk):
  h, w, y = data["hidden"], data["weight"], data["targets"]
  got, lse = losses.token_logprobs(h, w, y, vocab_chunk=chunk, return_lse=True)
  want, want_lse = dense_logprobs(h, w, y)
  assert got.dtype == jnp.float32 and got.shape == (B, T)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
  # Gradients w.r.t. hidden and head through a non-trivial cotangent (per-token weights), plus the lse path.
  ct = jax.random.normal(jax.random.PRNGKey(7), (B, T))

  def f_chunk(h, w):
    lp, z = losses.token_logprobs(h, w, y, vocab_chunk=chunk, return_lse=True)
    return jnp.sum(ct * lp) + 0.1 * jnp.sum(z ** 2)

  def f_dense(h, w):
    lp, z = dense_logprobs(h, w, y)
    return jnp.sum(ct * lp) + 0.1 * jnp.sum(z ** 2)

  g_chunk = jax.jit(jax.grad(f_chunk, argnums=(0, 1)))(h, w)
  g_dense = jax.jit(jax.grad(f_dense, argnums=(0, 1)))(h, w)
  for a, b in zip(g_chunk, g_dense):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_token_logprobs_divisor_chunking_matches_dense():
  """V = 48 with vocab_chunk 10: six unpadded chunks of 8 (the divisor path; V = 37 above exercises padding)."""
  k = jax.random.split(jax.random.PRNGKey(1), 3)
  h, w = jax.random.normal(k[0], (B, T, D)), jax.random.normal(k[1], (D, 48))
  y = jax.random.randint(k[2], (B, T), 0, 48)
  assert losses._chunking(48, 10) == (6, 8)
  got, lse = jax.jit(lambda h, w: losses.token_logprobs(h, w, y, vocab_chunk=10, return_lse=True))(h, w)
  want, want_lse = dense_logprobs(h, w, y)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
  g_got = jax.jit(jax.grad(lambda w: losses.token_logprobs(h, w, y, vocab_chunk=10).sum()))(w)
  g_want = jax.grad(lambda w: dense_logprobs(h, w, y)[0].sum())(w)
  np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-5)


def test_vocab_sharded_head_is_never_gathered():
  """Head sharded over V on a 'tensor' axis of 4 devices: chunks are strided, so the compiled forward+backward has
  no all-gather of the (D, V) head, and the result equals the single-device one."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
  b, t, d, v = 4, 8, 16, 1024
  k = jax.random.split(jax.random.PRNGKey(2), 3)
  h, w = jax.random.normal(k[0], (b, t, d)), jax.random.normal(k[1], (d, v)) * 0.3
  y = jax.random.randint(k[2], (b, t), 0, v)
  h_s = jax.device_put(h, NamedSharding(mesh, P("data")))
  w_s = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
  y_s = jax.device_put(y, NamedSharding(mesh, P("data")))
  fn = jax.jit(jax.value_and_grad(lambda h, w, y: losses.token_logprobs(h, w, y, vocab_chunk=128).sum(),
                                  argnums=(0, 1)))
  hlo = fn.lower(h_s, w_s, y_s).compile().as_text()
  assert not re.search(rf"f32\[{d},{v}\][^\n]*all-gather\(", hlo)
  assert not re.search(rf"f32\[{d},\d+,\d+\][^\n]*all-gather\(", hlo)
  value, (g_h, g_w) = fn(h_s, w_s, y_s)
  want_value, (want_h, want_w) = jax.value_and_grad(lambda h, w: dense_logprobs(h, w, y)[0].sum(), argnums=(0, 1))(h, w)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(g_h, want_h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_w, want_w, rtol=1e-5, atol=1e-5)


def test_token_logprobs_bf16_inputs_give_fp32(data):
  h, w, y = data["hidden"].astype(jnp.bfloat16), data["weight"].astype(jnp.bfloat16), data["targets"]
  got = jax.jit(lambda h, w: losses.token_logprobs(h, w, y, vocab_chunk=16))(h, w)
  assert got.dtype == jnp.float32
  want, _ = dense_logprobs(h, w, y)  # same bf16 values, fp32 math
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_token_logprobs_never_materialises_full_vocab_in_backward():
  """Large V and tiny chunk: no (B, T, V)-sized buffer appears in the compiled forward+backward."""
  b, t, d, v, chunk = 1, 128, 8, 4096, 256
  h = jnp.ones((b, t, d), jnp.float32)
  w = jnp.ones((d, v), jnp.float32)
  y = jnp.zeros((b, t), jnp.int32)
  grad_fn = jax.jit(jax.grad(lambda h, w: losses.token_logprobs(h, w, y, vocab_chunk=chunk).sum(), argnums=(0, 1)))
  compiled = grad_fn.lower(h, w).compile()
  hlo = compiled.as_text()
  assert f"f32[{b * t},{chunk}]" in hlo  # the per-chunk (tokens, chunk) tile
  assert f"f32[{b},{t},{v}]" not in hlo and f"f32[{t},{v}]" not in hlo
  # Keeping every chunk's (tokens, chunk) logits for the backward pass would take > B*T*V*4 bytes in all.
  assert compiled.memory_analysis().temp_size_in_bytes < b * t * v * 4 // 2


def test_out_of_range_targets_are_finite_and_masked(data):
  h, w = data["hidden"], data["weight"]
  y = data["targets"].at[0, 0].set(-100).at[1, 2].set(V + 3)
  weights = jnp.ones((B, T)).at[0, 0].set(0).at[1, 2].set(0)
  lp = losses.token_logprobs(h, w, y, vocab_chunk=8)
  assert np.all(np.isfinite(lp))
  grad = jax.jit(jax.grad(lambda h: losses.masked_sum(losses.token_logprobs(h, w, y, vocab_chunk=8), weights)))(h)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("chunk,temperature", [(8, 1.0), (37, 2.0), (10, 0.5)])
def test_chunked_kl_matches_dense(data, chunk, temperature):
  sh, sw, th, tw = data["hidden"], data["weight"], data["t_hidden"], data["t_weight"]
  got = losses.chunked_kl(sh, sw, th, tw, vocab_chunk=chunk, temperature=temperature)
  want = dense_kl(sh, sw, th, tw, temperature)
  assert got.dtype == jnp.float32 and got.shape == (B, T)
  assert np.all(np.asarray(want) > 1e-3)  # a non-trivial KL
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(jax.random.PRNGKey(3), (B, T))
  g_got = jax.jit(jax.grad(lambda *a: jnp.sum(ct * losses.chunked_kl(*a, vocab_chunk=chunk, temperature=temperature)),
                           argnums=(0, 1, 2, 3)))(sh, sw, th, tw)
  g_want = jax.jit(jax.grad(lambda *a: jnp.sum(ct * dense_kl(*a, temperature)), argnums=(0, 1, 2, 3)))(sh, sw, th, tw)
  for a, b in zip(g_got, g_want):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_kl_is_zero_for_identical_distributions(data):
  kl = losses.chunked_kl(data["hidden"], data["weight"], data["hidden"], data["weight"], vocab_chunk=8)
  np.testing.assert_allclose(kl, 0.0, atol=1e-5)


def test_logprobs_from_logits_matches_dense(data):
  logits = jnp.einsum("btd,dv->btv", data["hidden"], data["weight"])
  got, lse = losses.logprobs_from_logits(logits.astype(jnp.bfloat16), data["targets"], return_lse=True)
  assert got.dtype == jnp.float32
  want = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.bfloat16).astype(jnp.float32)),
                             data["targets"][..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  chunked = losses.token_logprobs(data["hidden"], data["weight"], data["targets"], vocab_chunk=8)
  np.testing.assert_allclose(losses.logprobs_from_logits(logits, data["targets"]), chunked, rtol=1e-5, atol=1e-5)


def test_cross_entropy_sums_and_z_loss(data):
  h, w, y = data["hidden"], data["weight"], data["targets"]
  weights = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
  loss_sum, weight_sum, aux = losses.cross_entropy(h, w, y, weights, z_loss_weight=1e-2, vocab_chunk=8)
  lp, lse = dense_logprobs(h, w, y)
  want_nll = -jnp.sum(lp * weights)
  want_z = 1e-2 * jnp.sum(lse ** 2 * weights)
  assert float(weight_sum) == 8.0
  np.testing.assert_allclose(aux["nll_sum"], want_nll, rtol=1e-5)
  np.testing.assert_allclose(aux["z_loss_sum"], want_z, rtol=1e-5)
  np.testing.assert_allclose(loss_sum, want_nll + want_z, rtol=1e-5)
  np.testing.assert_allclose(aux["nll"], -lp, rtol=1e-5, atol=1e-5)
  _, _, aux0 = losses.cross_entropy(h, w, y, weights, vocab_chunk=8)
  assert float(aux0["z_loss_sum"]) == 0.0


def test_normalisation_by_true_token_count_is_accumulation_invariant(data):
  """Micro-batches with different token counts: summing (loss_sum, weight_sum) and dividing once equals the full
  batch's token mean, values and gradients; averaging per-micro-batch means would not."""
  h, w, y = data["hidden"], data["weight"], data["targets"]
  weights = jnp.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)

  def full(w):
    loss_sum, weight_sum, _ = losses.cross_entropy(h, w, y, weights, vocab_chunk=8)
    return loss_sum / weight_sum

  def accumulated(w):
    sums = [losses.cross_entropy(h[i:i + 1], w, y[i:i + 1], weights[i:i + 1], vocab_chunk=8)[:2] for i in range(B)]
    return sum(s for s, _ in sums) / sum(c for _, c in sums)

  def mean_of_means(w):
    parts = [losses.cross_entropy(h[i:i + 1], w, y[i:i + 1], weights[i:i + 1], vocab_chunk=8)[:2] for i in range(B)]
    return sum(s / c for s, c in parts) / B

  np.testing.assert_allclose(jax.jit(accumulated)(w), jax.jit(full)(w), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(accumulated))(w), jax.jit(jax.grad(full))(w), rtol=1e-5, atol=1e-7)
  assert abs(float(jax.jit(mean_of_means)(w)) - float(jax.jit(full)(w))) > 1e-3


def test_masked_reductions():
  values = jnp.array([[1.0, 2.0, jnp.nan], [4.0, jnp.inf, 6.0]])
  weights = jnp.array([[1.0, 0.5, 0.0], [2.0, 0.0, 1.0]])
  assert float(losses.masked_sum(values, weights)) == 1.0 + 1.0 + 8.0 + 6.0
  np.testing.assert_allclose(losses.masked_mean(values, weights), 16.0 / 4.5, rtol=1e-6)
  assert float(losses.masked_mean(values, jnp.zeros_like(weights))) == 0.0


def test_per_group_sums():
  values = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  weights = jnp.array([[1.0, 1.0, 0.0], [1.0, 2.0, 1.0]])
  groups = jnp.array([[0, 2, 2], [1, 2, 7]])  # 7 is out of range: dropped
  sums, counts = losses.per_group_sums(values, weights, groups, 3)
  np.testing.assert_allclose(sums, [1.0, 4.0, 2.0 + 10.0])
  np.testing.assert_allclose(counts, [1.0, 1.0, 3.0])


def test_shape_errors(data):
  with pytest.raises(ValueError, match="targets"):
    losses.token_logprobs(data["hidden"], data["weight"], data["targets"][:, :3])
  with pytest.raises(ValueError, match="head weight"):
    losses.token_logprobs(data["hidden"], data["weight"].T, data["targets"])
  with pytest.raises(ValueError, match="vocab_chunk"):
    losses.token_logprobs(data["hidden"], data["weight"], data["targets"], vocab_chunk=0)
