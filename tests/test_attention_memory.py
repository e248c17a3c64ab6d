"""Issue 11 item 6: a configuration that would materialise (T, T) attention scores above a size is refused with the
numbers, by the check a stage calls before compiling and by the attention layer while tracing; the SFT stage configs
pick the platform's memory-efficient kernel."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanbeige_jax.model import Decoder, get_preset
from nanbeige_jax.model.attention import check_attention_memory, xla_score_bytes


def test_32k_sft_row_on_the_xla_path_is_refused_with_the_numbers():
  cfg = get_preset("nanbeige4_3b", attention_impl="xla")
  assert xla_score_bytes(20, 32768) == 85_899_345_920  # the issue's ~86 GB per 32K row
  with pytest.raises(ValueError, match=r"attention_impl='xla' would materialise fp32 \(T, T\) attention scores of "
                     r"85\.9 GB per row \(20 heads x 32768\^2 x 4 bytes; 344 GB for a batch of 4 rows\) > "
                     r"ModelConfig\.max_xla_attention_bytes=8\.59 GB"):
    check_attention_memory(cfg, 4, 32768)
  auto = cfg.replace(attention_impl="auto")
  for platform in ("tpu", "gpu"):  # splash / cudnn: no (T, T) scores in memory
    check_attention_memory(auto, 4, 32768, platform=platform)
  with pytest.raises(ValueError, match=r"resolved from 'auto' on cpu"):
    check_attention_memory(auto, 4, 32768, platform="cpu")
  check_attention_memory(cfg, 64, 4096)  # pre-training rows (1.34 GB each) pass
  check_attention_memory(cfg.replace(max_xla_attention_bytes=None), 4, 32768)  # the limit can be lifted
  check_attention_memory(cfg.replace(max_xla_attention_bytes=100 * 10**9), 4, 32768)
  with pytest.raises(ValueError, match=r"ModelConfig.max_xla_attention_bytes: expected a positive int or None"):
    cfg.replace(max_xla_attention_bytes=0)


def test_the_attention_layer_enforces_the_limit_while_tracing():
  cfg = get_preset("test", max_xla_attention_bytes=4 * 4 * 64 * 64)  # 4 heads: rows of up to 64 tokens
  model = Decoder(cfg, rngs=nnx.Rngs(0))

  def forward(t):
    tokens = jnp.zeros((2, t), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t), (2, t))
    return jax.eval_shape(lambda: model(tokens, positions, None))

  assert forward(64).shape[:2] == (2, 64)
  with pytest.raises(ValueError, match=r"0\.000262 GB per row"):
    forward(128)


@pytest.mark.parametrize("name", ["cold_start", "overall", "tiny_arithmetic"])
def test_sft_stage_configs_pick_auto(name):
  import gin

  from nanbeige_jax.config import parse_gin
  from nanbeige_jax.train import sft  # noqa: F401  (registers SFTConfig)
  parse_gin([f"sft/{name}.gin"])
  assert gin.query_parameter("SFTConfig.model_overrides")["attention_impl"] == "auto"
