"""Evaluation: held-out perplexity per text source and generative accuracy (avg@k, pass@k) on verifiable tasks.

``run_eval(cfg)`` (what ``launch/eval.py`` calls) loads a checkpoint and its tokenizer, checks every input that can
be checked (tokenizer vs checkpoint vocabulary, stop tokens, prompt lengths vs the cache) before anything compiles,
then:

* **perplexity**: one deterministic pass over each source's eval split (``MixtureIterator(split="eval")``
  batches, packed), token-weighted mean NLL and ``exp`` of it;
* **generative accuracy**: for each held-out problem, ``k`` samples at the configured temperature/top-p (paper:
  0.6 / 0.95), each answer checked with math-verify under a per-sample timeout. ``avg@k`` is the mean correctness
  over all ``problems x k`` samples; ``pass@k`` the fraction of problems with at least one correct sample (the
  unbiased estimator with n = k).

Results go to a JSON file and a printed table.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanbeige_jax import paths
from nanbeige_jax.config import gin_dataclass
from nanbeige_jax.data.chat_template import user_prompt
from nanbeige_jax.data.mixture import MixtureIterator
from nanbeige_jax.data.sft_data import ARITHMETIC_INSTRUCTION
from nanbeige_jax.data.sources import build_source
from nanbeige_jax.data.tasks import arithmetic
from nanbeige_jax.data.tasks.arithmetic import DIFFICULTIES
from nanbeige_jax.data.tokenizer import Tokenizer
from nanbeige_jax.generate import Sampler, SamplingConfig, load_model, resolve_stop_tokens
from nanbeige_jax.objectives.lm import make_lm_loss
from nanbeige_jax.rewards.math_verify import check_answer

PROMPT_FORMATS = ("auto", "plain", "chat")
TASKS = ("arithmetic",)


@gin_dataclass
@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate and how. Bound from gin (``EvalConfig.<field> = ...``) or built directly."""

  workdir: str = "runs/pretrain_tiny"       # a launch/pretrain.py run directory (checkpoints/, tokenizer.model)
  checkpoint_dir: str | None = None          # default <workdir>/checkpoints
  step: int | None = None                    # None: the latest committed step
  tokenizer_path: str | None = None          # default <workdir>/tokenizer.model
  output: str | None = None                  # default <workdir>/eval/step_<step>.json
  dtype: str = "float32"                     # compute dtype for evaluation
  rope_theta: float | None = None            # RoPE base override; None: the base the checkpoint was trained at
  # perplexity
  sources: dict | None = None                # name -> {kind: ...}; None: the checkpoint's training sources
  ppl_seq_len: int = 256
  ppl_batch_size: int = 8
  ppl_max_batches: int = 8                   # per source (0 = the whole eval split)
  # generative accuracy
  tasks: tuple = ("arithmetic",)
  difficulties: tuple = (1, 2, 3)            # arithmetic levels of the held-out problems (0 = single-step warm-up)
  num_problems: int = 64
  num_samples: int = 8                       # k in avg@k / pass@k
  temperature: float = 0.6
  top_p: float = 0.95
  top_k: int = 0
  max_new_tokens: int = 160
  prompt_format: str = "auto"                # plain (pre-training text format), chat (ChatML), auto (by stage)
  stop_tokens: tuple = ()                    # ids or special-token strings; () -> by prompt format
  generation_batch_size: int = 64            # sequences per sampler call
  seed: int = 0
  verify_timeout_s: float = 5.0
  examples_in_json: int = 8

  def __post_init__(self):
    positive = ("ppl_seq_len", "ppl_batch_size", "num_problems", "num_samples", "max_new_tokens",
                "generation_batch_size")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"EvalConfig.{name}: expected a positive int, found {value!r}")
    if not isinstance(self.ppl_max_batches, int) or self.ppl_max_batches < 0:
      raise ValueError(f"EvalConfig.ppl_max_batches: expected an int >= 0, found {self.ppl_max_batches!r}")
    if self.prompt_format not in PROMPT_FORMATS:
      raise ValueError(f"EvalConfig.prompt_format: expected one of {PROMPT_FORMATS}, found {self.prompt_format!r}")
    unknown = [t for t in self.tasks if t not in TASKS]
    if unknown:
      raise ValueError(f"EvalConfig.tasks: unknown task(s) {unknown}; known: {TASKS}")
    if (not isinstance(self.difficulties, (tuple, list)) or not self.difficulties
        or any(d not in DIFFICULTIES for d in self.difficulties)):
      raise ValueError(f"EvalConfig.difficulties: expected a non-empty subset of {DIFFICULTIES}, "
                       f"found {self.difficulties!r}")
    if not self.verify_timeout_s > 0:
      raise ValueError(f"EvalConfig.verify_timeout_s: expected > 0, found {self.verify_timeout_s!r}")
    SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                   top_k=self.top_k)  # validates the sampling fields


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, found n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def accuracy_metrics(correct: np.ndarray) -> dict[str, float]:
  """correct: (problems, k) bool -> avg@k and pass@k."""
  correct = np.asarray(correct, bool)
  p, k = correct.shape
  return {f"avg@{k}": float(correct.mean()),
          f"pass@{k}": float(np.mean([pass_at_k(k, int(c), k) for c in correct.sum(1)])),
          "num_problems": p, "k": k}


# --------------------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------------------
def make_nll_fn(model, rope_theta: float | None = None) -> Callable[[dict[str, np.ndarray]], tuple[float, float]]:
  """A jitted batch -> (sum of token NLL weighted by loss_weights, sum of weights): the training LM objective's
  cross-entropy term (``nanbeige_jax.objectives.lm``)."""
  graphdef, state = nnx.split(model)
  objective = make_lm_loss()
  theta = model.cfg.rope_theta if rope_theta is None else rope_theta

  @jax.jit
  def nll(state, batch):
    terms, _ = objective(nnx.merge(graphdef, state), batch, theta)
    return terms["ce"]

  def run(batch):
    keys = ("inputs", "targets", "positions", "segment_ids")
    total, weight = nll(state, {**{k: jnp.asarray(batch[k]) for k in keys},
                                "loss_weights": jnp.asarray(batch["loss_weights"], jnp.float32)})
    return float(total), float(weight)
  return run


def perplexity(model, tokenizer, sources: dict[str, Any], *, seq_len: int, batch_size: int,
               max_batches: int | None, rope_theta: float | None = None) -> dict[str, dict[str, float]]:
  """Per source: mean NLL per target token and perplexity over (up to ``max_batches`` batches of) its eval split."""
  data = MixtureIterator(sources, tokenizer, batch_size=batch_size, seed=0, split="eval")
  nll_fn = make_nll_fn(model, rope_theta)
  out = {}
  for name in data.source_names:
    total = weight = 0.0
    for batch in data.eval_batches(name, seq_len, max_batches=max_batches or None):
      t, w = nll_fn(batch)
      total, weight = total + t, weight + w
    if weight == 0:
      raise ValueError(f"perplexity: source {name!r} has no eval tokens")
    out[name] = {"nll": total / weight, "perplexity": math.exp(total / weight), "tokens": int(weight)}
  return out


# --------------------------------------------------------------------------------------------------------------
# Generative accuracy
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TaskItem:
  id: str
  prompt_ids: list[int]
  answer: str
  question: str


def arithmetic_items(tokenizer, num_problems: int, prompt_format: str, seed: int = 0,
                     difficulties: Sequence[int] = (1, 2, 3)) -> list[TaskItem]:
  """Held-out arithmetic problems of the given difficulty levels as prompts: ``plain`` is the pre-training text
  format up to "Answer:", ``chat`` a ChatML user turn with the SFT data's instruction (the model answers in its
  assistant turn)."""
  items = []
  for p in arithmetic.generate("heldout", num_problems, seed=seed, difficulties=tuple(difficulties)):
    if prompt_format == "plain":
      text = arithmetic.render_for_pretraining(p)
      prefix = text[:text.index("\nAnswer:") + len("\nAnswer:")]
      ids = [tokenizer.bos_id] + tokenizer.encode(prefix)
    else:
      ids = user_prompt(p.question + ARITHMETIC_INSTRUCTION, tokenizer)
    items.append(TaskItem(p.id, ids, str(p.answer), p.question))
  return items


def generate_samples(sampler: Sampler, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, k: int, *,
                     batch_size: int, seed: int) -> list[list[tuple[np.ndarray, str]]]:
  """k samples per prompt -> [prompt][sample] = (token ids, finish reason). Calls use one fixed batch size
  (the last is filled with repeats) and one padded prompt length, so the sampler compiles once."""
  longest = sampler.check_prompts(prompts, sampling)  # every prompt checked before anything compiles
  prompt_length = min(-(-longest // sampler.prompt_bucket) * sampler.prompt_bucket,
                      sampler.max_cache_length - sampling.max_new_tokens)
  flat = [(i, j) for i in range(len(prompts)) for j in range(k)]
  seeds = [seed * 1_000_003 + i * k + j for i, j in flat]
  size = min(batch_size, len(flat))
  out: list[list[Any]] = [[None] * k for _ in prompts]
  for start in range(0, len(flat), size):
    chunk = flat[start:start + size]
    fill = size - len(chunk)
    result = sampler.generate([prompts[i] for i, _ in chunk] + [prompts[chunk[0][0]]] * fill, sampling,
                              seeds=seeds[start:start + len(chunk)] + [0] * fill, prompt_length=prompt_length)
    for n, (i, j) in enumerate(chunk):
      out[i][j] = (result.tokens[n], result.finish_reasons[n])
  return out


def score_samples(items: Sequence[TaskItem], samples, tokenizer, stop_ids: Sequence[int], timeout_s: float
                  ) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Decode and check every sample -> correct (problems, k) and per-sample records."""
  correct = np.zeros((len(items), len(samples[0])), bool)
  records = []
  for i, (item, row) in enumerate(zip(items, samples)):
    for j, (tokens, finish) in enumerate(row):
      body = tokens[:-1] if finish == "eos" and len(tokens) and int(tokens[-1]) in stop_ids else tokens
      text = tokenizer.decode(body.tolist())
      check = check_answer(text, item.answer, timeout_s=timeout_s)
      correct[i, j] = check.correct
      records.append({"id": item.id, "sample": j, "completion": text, "extracted": check.extracted,
                      "status": check.status, "correct": check.correct, "finish": finish, "tokens": len(tokens)})
  return correct, records


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------
def _resolve_paths(cfg: EvalConfig) -> tuple[paths.Path, paths.Path]:
  """``EvalConfig.workdir`` is a run workdir or a checkpoint directory (``paths.resolve_run_dirs``);
  ``checkpoint_dir``/``tokenizer_path`` override what it implies."""
  if cfg.checkpoint_dir:
    ckpt, workdir = paths.resolve_run_dirs(cfg.checkpoint_dir)
    if cfg.workdir:
      workdir = paths.as_path(cfg.workdir)
  else:
    ckpt, workdir = paths.resolve_run_dirs(cfg.workdir, what="EvalConfig.workdir")
  tok = paths.as_path(cfg.tokenizer_path) if cfg.tokenizer_path else workdir / "tokenizer.model"
  if not paths.is_file(tok):
    raise ValueError(f"tokenizer {str(tok)!r} does not exist (set EvalConfig.tokenizer_path)")
  return ckpt, tok


def default_stop_tokens(prompt_format: str) -> tuple[str, ...]:
  return ("</s>",) if prompt_format == "plain" else ("<|im_end|>", "</s>")


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
  ckpt_dir, tok_path = _resolve_paths(cfg)
  tokenizer = Tokenizer.load(tok_path)
  model, metadata, step = load_model(ckpt_dir, step=cfg.step, tokenizer=tokenizer, dtype=cfg.dtype)
  prompt_format = cfg.prompt_format
  if prompt_format == "auto":
    prompt_format = "plain" if metadata.get("stage") == "pretrain" else "chat"
  stop_ids = resolve_stop_tokens(cfg.stop_tokens or default_stop_tokens(prompt_format), tokenizer.special_ids)
  sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, stop_token_ids=stop_ids)
  sampler = Sampler(model, pad_id=tokenizer.pad_id, rope_theta=cfg.rope_theta, vocab_limit=tokenizer.vocab_size)
  sampling.check_vocab(model.cfg.vocab_size)
  source_specs = cfg.sources if cfg.sources is not None else (metadata.get("extra") or {}).get("sources")
  if not source_specs:
    raise ValueError("EvalConfig.sources is unset and the checkpoint metadata records no training sources")
  sources = {}
  for name, spec in source_specs.items():
    if not isinstance(spec, dict) or "kind" not in spec:
      raise ValueError(f"EvalConfig.sources[{name!r}]: expected a dict with a 'kind' key, found {spec!r}")
    sources[name] = build_source(spec["kind"], name, **{k: v for k, v in spec.items() if k != "kind"})
  task_items = {"arithmetic": arithmetic_items(tokenizer, cfg.num_problems, prompt_format,
                                               difficulties=cfg.difficulties)}
  task_items = {t: task_items[t] for t in cfg.tasks}
  for task, items in task_items.items():  # prompt length vs cache: before anything compiles
    for item in items:
      sampler.check_prompts([item.prompt_ids], sampling)

  results: dict[str, Any] = {"checkpoint": str(ckpt_dir), "step": step, "stage": metadata.get("stage"),
                             "tokenizer": str(tok_path), "model_config": model.cfg.to_dict(),
                             "eval_config": dataclasses.asdict(cfg), "prompt_format": prompt_format,
                             "rope_theta": cfg.rope_theta if cfg.rope_theta is not None else model.cfg.rope_theta}
  start = time.perf_counter()
  results["perplexity"] = perplexity(model, tokenizer, sources, seq_len=cfg.ppl_seq_len,
                                     batch_size=cfg.ppl_batch_size, max_batches=cfg.ppl_max_batches,
                                     rope_theta=cfg.rope_theta)
  results["perplexity_seconds"] = time.perf_counter() - start
  results["tasks"] = {}
  for task, items in task_items.items():
    start = time.perf_counter()
    samples = generate_samples(sampler, [it.prompt_ids for it in items], sampling, cfg.num_samples,
                               batch_size=cfg.generation_batch_size, seed=cfg.seed)
    gen_seconds = time.perf_counter() - start
    correct, records = score_samples(items, samples, tokenizer, stop_ids, cfg.verify_timeout_s)
    metrics = accuracy_metrics(correct)
    metrics.update({
        "difficulties": list(cfg.difficulties), "temperature": cfg.temperature, "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "max_new_tokens": cfg.max_new_tokens, "generation_seconds": gen_seconds,
        "mean_completion_tokens": float(np.mean([r["tokens"] for r in records])),
        "finished_eos": float(np.mean([r["finish"] == "eos" for r in records])),
        "verify_timeouts": sum(r["status"] == "timeout" for r in records),
        "no_answer": sum(r["status"] == "no_answer" for r in records),
        "examples": records[:cfg.examples_in_json]})
    results["tasks"][task] = metrics
  output = pathlib.Path(cfg.output) if cfg.output else pathlib.Path(cfg.workdir) / "eval" / f"step_{step}.json"
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = output.with_suffix(output.suffix + f".tmp.{os.getpid()}")
  tmp.write_text(json.dumps(results, indent=2, default=str))
  os.replace(tmp, output)
  results["output"] = str(output)
  return results


def format_table(results: dict[str, Any]) -> str:
  lines = [f"checkpoint {results['checkpoint']} step {results['step']} ({results.get('stage')})", "",
           f"{'source':<20}{'tokens':>10}{'nll':>10}{'perplexity':>12}"]
  for name, r in results["perplexity"].items():
    lines.append(f"{name:<20}{r['tokens']:>10}{r['nll']:>10.4f}{r['perplexity']:>12.3f}")
  for task, m in results.get("tasks", {}).items():
    k = m["k"]
    lines += ["", f"{'task':<14}{'problems':>9}{f'avg@{k}':>9}{f'pass@{k}':>9}{'eos':>7}{'len':>7}  sampling",
              f"{task:<14}{m['num_problems']:>9}{m[f'avg@{k}']:>9.3f}{m[f'pass@{k}']:>9.3f}"
              f"{m['finished_eos']:>7.2f}{m['mean_completion_tokens']:>7.1f}  T={m['temperature']} "
              f"top_p={m['top_p']} max_new={m['max_new_tokens']} ({results['prompt_format']} prompts, "
              f"difficulties {m.get('difficulties')})"]
  return "\n".join(lines)
