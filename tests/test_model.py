"""Decoder shape, parameter count, scan/unscanned/remat equivalence, KV cache and segment masking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanbeige_jax.model import Decoder, ModelConfig, count_params, get_preset


def test_nanbeige4_3b_param_count_from_abstract_shapes():
  cfg = get_preset("nanbeige4_3b")
  assert count_params(cfg) == 3_933_637_120
  assert cfg.num_params() == 3_933_637_120
  assert count_params(get_preset("nanbeige4_1_3b")) == 3_933_637_120
  assert get_preset("nanbeige4_1_3b").rope_theta == 7e7


def test_presets_and_tied_count():
  for name in ("tiny", "small", "test"):
    cfg = get_preset(name)
    assert count_params(cfg) == cfg.num_params()
  tied = get_preset("test", tie_word_embeddings=True)
  assert count_params(tied) == tied.num_params() == get_preset("test").num_params() - 64 * 256


def test_config_validation_is_one_line():
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="no field"):
    get_preset("test", num_layer=3)
  with pytest.raises(ValueError, match="remat_policy"):
    get_preset("test", remat_policy="sometimes")
  with pytest.raises(ValueError, match="unknown model preset"):
    get_preset("nanbeige5")


def test_logical_axes_on_every_param():
  from nanbeige_jax.model import abstract_model
  from nanbeige_jax.sharding import logical_axes_tree
  state = nnx.state(abstract_model(get_preset("test")), nnx.Param)
  axes = logical_axes_tree(state)
  shapes = nnx.to_pure_dict(state)
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  flat_shapes = jax.tree.leaves(shapes)
  assert len(flat_axes) == len(flat_shapes) == 12
  for a, s in zip(flat_axes, flat_shapes):
    assert len(a) == len(s.shape) and all(isinstance(n, str) for n in a)
  assert axes["layers"]["attn"]["q_proj"] == ("layers", "embed", "heads", "head_dim")
  assert axes["embed"] == ("vocab", "embed") and axes["lm_head"] == ("embed", "vocab")


@pytest.fixture(scope="module")
def model_and_tokens():
  cfg = get_preset("test")
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  return cfg, model, tokens


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "full"), (False, "save_dots"),
                                        (True, "save_qkv_out")])
def test_scan_and_remat_do_not_change_the_function(model_and_tokens, scan, remat):
  cfg, model, tokens = model_and_tokens
  ref = model(tokens)
  other = Decoder(cfg.replace(scan_layers=scan, remat_policy=remat), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(other(tokens), ref, atol=1e-5, rtol=0)

  def loss(m):
    return jnp.mean(m(tokens) ** 2)
  g_ref = nnx.grad(loss)(model)
  g = nnx.grad(loss)(other)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_bf16_compute_returns_fp32_logits(model_and_tokens):
  cfg, _, tokens = model_and_tokens
  m = Decoder(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  out = m(tokens)
  assert out.dtype == jnp.float32
  assert m.embed[...].dtype == jnp.float32


def test_incremental_decode_with_cache_equals_full_forward(model_and_tokens):
  cfg, model, tokens = model_and_tokens
  full = model(tokens)
  cache = model.init_cache(2, 20)
  out, cache = model(tokens[:, :7], cache=cache)
  outs = [out]
  for i in range(7, 12):
    o, cache = model(tokens[:, i:i + 1], cache=cache)
    outs.append(o)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=0)
  assert int(cache.index) == 12


def test_packed_segments_do_not_attend_across_documents(model_and_tokens):
  cfg, model, tokens = model_and_tokens
  a, b = tokens[0, :5], tokens[1, :7]
  packed = jnp.concatenate([a, b])[None]
  seg = jnp.array([[1] * 5 + [2] * 7])
  pos = jnp.array([list(range(5)) + list(range(7))])
  out = model(packed, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(out[0, :5], model(a[None])[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 5:], model(b[None])[0], atol=1e-5)


def _attention_inputs(t=256):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  b, h, kv, d = 2, 4, 2, 64
  q = jax.random.normal(k1, (b, t, h, d))
  k = jax.random.normal(k2, (b, t, kv, d))
  v = jax.random.normal(k3, (b, t, kv, d))
  cut = 100 * t // 256
  seg = jnp.concatenate([jnp.ones((b, cut), jnp.int32), 2 * jnp.ones((b, t - cut), jnp.int32)], 1)
  return q, k, v, seg


def _xla_reference(q, k, v, seg):
  from nanbeige_jax.model.attention import attention_mask, xla_attention
  t = q.shape[1]
  idx = jnp.broadcast_to(jnp.arange(t), (q.shape[0], t))
  return xla_attention(q, k, v, attention_mask(idx, jnp.arange(t), seg, seg))


def test_splash_kernel_matches_xla_attention_values_and_grads():
  """The Pallas TPU splash kernel (interpret mode on CPU) against the XLA path, with GQA and packed segments."""
  from nanbeige_jax.model.attention import splash_attention
  q, k, v, seg = _attention_inputs()
  np.testing.assert_allclose(splash_attention(q, k, v, seg), _xla_reference(q, k, v, seg), atol=2e-5)
  w = jax.random.normal(jax.random.key(5), q.shape)
  g_splash = jax.grad(lambda *a: jnp.sum(splash_attention(*a, seg) * w), argnums=(0, 1, 2))(q, k, v)
  g_xla = jax.grad(lambda *a: jnp.sum(_xla_reference(*a, seg) * w), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_splash, g_xla):
    np.testing.assert_allclose(a, b, atol=5e-5)


def test_dot_product_attention_path_masks_like_xla():
  from nanbeige_jax.model.attention import cudnn_attention
  q, k, v, seg = _attention_inputs(t=64)
  np.testing.assert_allclose(cudnn_attention(q, k, v, seg, implementation="xla"), _xla_reference(q, k, v, seg),
                             atol=2e-5)
  ones = jnp.ones_like(seg)
  np.testing.assert_allclose(cudnn_attention(q, k, v, None, implementation="xla"), _xla_reference(q, k, v, ones),
                             atol=2e-5)
  if jax.devices()[0].platform != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      cudnn_attention(q, k, v, seg)


@pytest.mark.parametrize("mesh_kw", [dict(data=2, fsdp=1, tensor=4), dict(data=2, fsdp=2, tensor=2)])
def test_splash_under_shard_map_on_8_devices(mesh_kw):
  """Sharded splash: heads split over `tensor` (or kept whole when the kv heads cannot follow the query heads)."""
  from nanbeige_jax.model.attention import splash_attention
  from nanbeige_jax.sharding import make_mesh, use_mesh_rules
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(k1, (2, 128, 8, 64))
  k, v = jax.random.normal(k2, (2, 128, 2, 64)), jax.random.normal(k3, (2, 128, 2, 64))
  seg = jnp.concatenate([jnp.ones((2, 50), jnp.int32), 2 * jnp.ones((2, 78), jnp.int32)], 1)
  with use_mesh_rules(make_mesh(**mesh_kw)):
    out = jax.jit(splash_attention)(q, k, v, seg)
  np.testing.assert_allclose(out, _xla_reference(q, k, v, seg), atol=2e-5)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_project_forms_equal_einsum_values_and_grads(platform, monkeypatch):
  """Both forms of ``layers.project`` (flat 2-D matmul for CPU targets, batched dot_general elsewhere) compute the
  einsum they replace, gradients included."""
  from nanbeige_jax.model import layers
  monkeypatch.setattr(layers, "target_platform", lambda: platform)
  k = jax.random.split(jax.random.PRNGKey(3), 4)
  x, w = jax.random.normal(k[0], (2, 5, 8)), jax.random.normal(k[1], (8, 3, 4))
  a, wo = jax.random.normal(k[2], (2, 5, 3, 4)), jax.random.normal(k[3], (3, 4, 8))
  hp = jax.lax.Precision.HIGHEST
  with jax.default_matmul_precision("highest"):
    got = layers.project(x, w)
    np.testing.assert_allclose(got, jnp.einsum("btd,dhk->bthk", x, w, precision=hp), rtol=1e-6, atol=1e-6)
    got2 = layers.project(a, wo, contract=2)
    np.testing.assert_allclose(got2, jnp.einsum("bthk,hkd->btd", a, wo, precision=hp), rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda x, w: jnp.sum(jnp.sin(layers.project(x, w))), argnums=(0, 1))(x, w)
    g_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(jnp.einsum("btd,dhk->bthk", x, w, precision=hp))),
                     argnums=(0, 1))(x, w)
  for u, v in zip(g, g_ref):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="do not match"):
    layers.project(x, wo, contract=2)
