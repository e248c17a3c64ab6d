"""Decode throughput: the KV-cache sampler vs a no-cache baseline vs transformers ``generate``, side by side.

All three run greedy decoding of the same weights on the same batch of prompts for the same number of new tokens:

(a) ``nanbeige_jax.generate.Sampler``: jitted prefill + a ``lax.while_loop`` decode over a donated KV cache;
(b) no-cache baseline: one jitted ``lax.fori_loop`` that re-runs the full forward pass over the whole
    (prompt + new tokens) buffer for every new token (same model code, no cache);
(c) ``transformers`` ``LlamaForCausalLM.generate`` on CPU torch with ``use_cache=True``, the weights exported
    with ``nanbeige_jax.hf_export.save_hf_dir``.

Timings exclude compilation (one warm-up run each) and take the best of ``--repeats``. Tokens/s counts generated
tokens (batch x new tokens) over the whole call (prefill included, the same for all three).

  python benchmarks/generate.py --preset tiny --batch 4 --prompt_len 32 --new_tokens 256
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def best_time(fn, repeats: int) -> float:
  fn()  # warm-up (compiles)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def no_cache_decoder(model, batch: int, prompt_len: int, new_tokens: int):
  """Jitted greedy decoding that recomputes the full forward pass each step (no KV cache)."""
  graphdef, state = nnx.split(model)
  total = prompt_len + new_tokens

  @jax.jit
  def run(state, prompts):
    m = nnx.merge(graphdef, state)
    buf = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompts)

    def step(i, buf):
      logits = m(buf)  # causal: positions >= prompt_len + i do not affect position prompt_len + i - 1
      last = jax.lax.dynamic_slice_in_dim(logits, prompt_len + i - 1, 1, axis=1)[:, 0]
      return jax.lax.dynamic_update_slice(buf, jnp.argmax(last, -1).astype(jnp.int32)[:, None], (0, prompt_len + i))
    return jax.lax.fori_loop(0, new_tokens, step, buf)[:, prompt_len:]

  return lambda prompts: np.asarray(run(state, jnp.asarray(prompts)))


def main(argv=None) -> dict:
  from nanbeige_jax.generate import Sampler, SamplingConfig
  from nanbeige_jax.model import Decoder, get_preset
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--dtype", default="float32", help="compute dtype for our model (transformers runs fp32)")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--torch_threads", type=int, default=0, help="0 = torch's default")
  parser.add_argument("--skip_transformers", action="store_true")
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args(argv)

  cfg = get_preset(args.preset, dtype=args.dtype)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, size=(args.batch, args.prompt_len)).astype(np.int32)
  n_tokens = args.batch * args.new_tokens
  sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
  sampler = Sampler(model, prompt_bucket=1, max_cache_length=args.prompt_len + args.new_tokens)

  results: dict = {"preset": args.preset, "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "backend": jax.default_backend(),
                   "devices": len(jax.devices())}
  outputs = {}

  def ours():
    outputs["sampler"] = sampler.generate(list(prompts), sampling).token_array
  results["sampler_s"] = best_time(ours, args.repeats)

  baseline = no_cache_decoder(model, args.batch, args.prompt_len, args.new_tokens)

  def no_cache():
    outputs["no_cache"] = baseline(prompts)
  results["no_cache_s"] = best_time(no_cache, args.repeats)

  if not args.skip_transformers:
    import torch
    from transformers import LlamaForCausalLM

    from nanbeige_jax.hf_export import save_hf_dir
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    with tempfile.TemporaryDirectory() as tmp:
      save_hf_dir(f"{tmp}/hf", cfg, params, dtype="float32")
      hf = LlamaForCausalLM.from_pretrained(f"{tmp}/hf", dtype=torch.float32).eval()
    input_ids = torch.as_tensor(prompts, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)

    def transformers_generate():
      with torch.inference_mode():
        out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, use_cache=True,
                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
                          eos_token_id=None)
      outputs["transformers"] = out[:, args.prompt_len:].numpy()
    results["transformers_s"] = best_time(transformers_generate, args.repeats)
    results["torch_threads"] = torch.get_num_threads()

  for name in ("sampler", "no_cache", "transformers"):
    if f"{name}_s" in results:
      results[f"{name}_tokens_per_s"] = n_tokens / results[f"{name}_s"]
      if name != "sampler":
        results[f"{name}_token_agreement"] = float(np.mean(outputs[name] == outputs["sampler"]))
  results["speedup_vs_no_cache"] = results["no_cache_s"] / results["sampler_s"]
  if "transformers_s" in results:
    results["speedup_vs_transformers"] = results["transformers_s"] / results["sampler_s"]

  print(f"greedy decode, preset={args.preset} ({cfg.num_params() / 1e6:.1f}M params, {args.dtype}), "
        f"batch={args.batch}, prompt={args.prompt_len}, new={args.new_tokens}, backend={results['backend']}")
  print(f"{'engine':<28}{'seconds':>10}{'tokens/s':>12}{'same tokens':>13}")
  for name, label in (("sampler", "nanbeige_jax Sampler (KV)"), ("no_cache", "jitted no-cache recompute"),
                      ("transformers", "transformers generate")):
    if f"{name}_s" in results:
      agree = results.get(f"{name}_token_agreement")
      print(f"{label:<28}{results[f'{name}_s']:>10.3f}{results[f'{name}_tokens_per_s']:>12.1f}"
            f"{'' if agree is None else f'{agree:.3f}':>13}")
  print(f"speed-up vs no-cache baseline: {results['speedup_vs_no_cache']:.1f}x (target >= 10x)")
  if "speedup_vs_transformers" in results:
    print(f"speed-up vs transformers:      {results['speedup_vs_transformers']:.2f}x (target > 1x)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
