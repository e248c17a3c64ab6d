"""Logits parity of an HF Llama directory: this project's decoder (imported weights) vs transformers'
``LlamaForCausalLM`` on CPU torch, on random token ids (``launch/check_parity.py``)."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from nanbeige_jax.hf import load_hf_params
from nanbeige_jax.model.decoder import decoder_from_params


@dataclasses.dataclass(frozen=True)
class ParityReport:
  max_abs_diff: float  # max |logits_ours - logits_hf|
  max_abs_logit: float  # scale of the logits, for context
  argmax_agreement: float  # fraction of positions whose argmax token agrees
  shape: tuple[int, ...]

  def passes(self, tolerance: float) -> bool:
    return self.max_abs_diff <= tolerance and self.argmax_agreement == 1.0

  def __str__(self) -> str:
    return (f"logits {self.shape}: max |diff| = {self.max_abs_diff:.3e} (max |logit| {self.max_abs_logit:.3e}), "
            f"argmax agreement = {self.argmax_agreement:.4%}")


def check_parity(hf_dir: str | os.PathLike, *, batch: int = 2, seq_len: int = 32, seed: int = 0) -> ParityReport:
  """Load ``hf_dir`` into transformers' LlamaForCausalLM (torch, fp32, CPU) and into our Decoder (fp32 params and
  compute), run the same random tokens through both, and compare the logits."""
  if batch <= 0 or seq_len <= 0:
    raise ValueError(f"check_parity: batch and seq_len must be positive, found batch={batch}, seq_len={seq_len}")
  cfg, params = load_hf_params(hf_dir, param_dtype="float32", dtype="float32", scan_layers=True,
                               remat_policy="none", attention_impl="xla")
  if seq_len > cfg.max_position_embeddings:
    raise ValueError(f"check_parity: seq_len={seq_len} exceeds max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  import torch  # imported only once our side has loaded: a bad directory fails fast
  import transformers
  tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq_len), dtype=np.int64)
  model = decoder_from_params(cfg, params)
  del params
  ours = np.asarray(model(tokens.astype(np.int32)), np.float32)
  del model
  hf_model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                           attn_implementation="eager")
  hf_model.eval()
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(tokens)).logits.float().numpy()
  if theirs.shape != ours.shape:
    raise RuntimeError(f"logits shapes differ: ours {ours.shape}, transformers {theirs.shape}")
  return ParityReport(max_abs_diff=float(np.max(np.abs(ours - theirs))),
                      max_abs_logit=float(np.max(np.abs(theirs))),
                      argmax_agreement=float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
                      shape=tuple(ours.shape))
