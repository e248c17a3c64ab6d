"""Evaluation harness: avg@k / pass@k, math-verify answer checks with timeouts, and launch/eval.py end to end on a
real checkpoint, with bad input rejected before anything compiles."""
import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from nanbeige_jax.eval import EvalConfig, accuracy_metrics, pass_at_k
from nanbeige_jax.rewards import math_verify as mv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pass_at_k_and_avg_at_k():
  assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
  assert pass_at_k(4, 2, 1) == pytest.approx(0.5)
  assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))
  correct = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]], bool)
  m = accuracy_metrics(correct)
  assert m["avg@3"] == pytest.approx(5 / 12) and m["pass@3"] == pytest.approx(3 / 4)
  assert m["num_problems"] == 4 and m["k"] == 3
  with pytest.raises(ValueError, match="pass_at_k needs"):
    pass_at_k(3, 4, 1)


@pytest.mark.parametrize("completion, gold, correct, extracted", [
    ("3 apples at 4 each is 12.\nThe answer is 12.", 12, True, "12"),
    ("The answer is 13.", 12, False, "13"),
    ("The answer is 1,200.", 1200, True, "1,200"),
    ("The answer is 12.0", 12, True, "12.0"),
    ("so the total is \\boxed{\\frac{1}{2}}", "0.5", True, "\\boxed{\\frac{1}{2}}"),
    ("The answer is 5.\nWait. The answer is 7.", 7, True, "7"),
])
def test_check_answer(completion, gold, correct, extracted):
  check = mv.check_answer(completion, gold)
  assert (check.correct, check.extracted, check.status) == (correct, extracted, "ok")


def test_check_answer_without_answer_and_bad_gold():
  assert mv.check_answer("I do not know", 3).status == "no_answer"
  rambling = mv.check_answer("12 apples, 3 pens and 7 mugs", 7)
  assert (rambling.correct, rambling.status) == (False, "no_answer")  # no answer span: not math-verify's guess
  assert mv.check_answer("x = 0.5", "1/2", require_answer_span=False).correct
  with pytest.raises(ValueError, match="gold answer"):
    mv.check_answer("The answer is 3.", "")
  with pytest.raises(TypeError, match="completion must be a str"):
    mv.check_answer(b"The answer is 3.", 3)


def test_check_answer_timeout(monkeypatch):
  def slow(completion, gold, require_answer_span):
    time.sleep(30)
  monkeypatch.setattr(mv, "_check", slow)
  start = time.perf_counter()
  assert mv.check_answer("The answer is 3.", 3, timeout_s=0.3).status == "timeout"  # main thread: SIGALRM
  out = []
  worker = threading.Thread(target=lambda: out.append(mv.check_answer("The answer is 3.", 3, timeout_s=0.3)))
  worker.start()
  worker.join()
  assert out[0].status == "timeout" and not out[0].correct  # other threads: a killed child process
  assert time.perf_counter() - start < 10


def test_check_answer_in_a_thread_is_correct():
  out = []
  worker = threading.Thread(target=lambda: out.append(mv.check_answer("The answer is 42.", 42)))
  worker.start()
  worker.join()
  assert out[0].correct and out[0].status == "ok"


def write_run(workdir, tokenizer, vocab_size, tokenizer_fingerprint, rope_theta=None):
  """A pre-training-style workdir: tokenizer.model + a params checkpoint whose metadata records its sources."""
  import shutil

  import jax
  from flax import nnx

  from nanbeige_jax.checkpoint import build_metadata, save_params_checkpoint
  from nanbeige_jax.model import Decoder, get_preset
  notes = workdir / "notes.txt"
  notes.write_text("\n\n".join(f"Note {i}: the shop sold {i * 3} apples and {i + 4} pens today." for i in range(30)))
  if tokenizer.source != str(workdir / "tokenizer.model"):
    shutil.copy(tokenizer.source, workdir / "tokenizer.model")
  cfg = get_preset("test", vocab_size=vocab_size)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
  sources = {"arithmetic": {"kind": "arithmetic", "num_train": 60, "num_eval": 12},
             "notes": {"kind": "text", "paths": str(notes), "doc_per": "blank_line"}}
  metadata = build_metadata(cfg, stage="pretrain", tokenizer_fingerprint=tokenizer_fingerprint,
                            extra={"sources": sources}, rope_theta=rope_theta)
  save_params_checkpoint(workdir / "checkpoints", params, metadata, step=7)
  return workdir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  from nanbeige_jax.data.tasks import arithmetic
  from nanbeige_jax.data.tokenizer import Tokenizer, padded_vocab_size
  workdir = tmp_path_factory.mktemp("run")
  texts = [arithmetic.render_for_pretraining(p) for p in arithmetic.generate("train", 300)]
  tokenizer = Tokenizer.train(texts, workdir / "tokenizer", 400)
  return write_run(workdir, tokenizer, padded_vocab_size(tokenizer.vocab_size), tokenizer.fingerprint())


def small_eval(run_dir, **overrides):
  kw = dict(workdir=str(run_dir), num_problems=3, num_samples=2, max_new_tokens=24, ppl_seq_len=64,
            ppl_batch_size=4, ppl_max_batches=2, generation_batch_size=6)
  kw.update(overrides)
  return EvalConfig(**kw)


def test_launch_eval_end_to_end(run_dir):
  output = run_dir / "out.json"
  cmd = [sys.executable, os.path.join(REPO, "launch", "eval.py"), f"--workdir={run_dir}", "--num_problems=3",
         "--num_samples=2", f"--output={output}", "--gin_param=EvalConfig.max_new_tokens=24",
         "--gin_param=EvalConfig.ppl_seq_len=64", "--gin_param=EvalConfig.ppl_max_batches=2",
         "--gin_param=EvalConfig.generation_batch_size=6", "--gin_param=EvalConfig.difficulties=(0, 1)"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "avg@2" in proc.stdout and "pass@2" in proc.stdout and "perplexity" in proc.stdout
  results = json.loads(output.read_text())
  assert results["step"] == 7 and results["prompt_format"] == "plain"
  vocab = results["model_config"]["vocab_size"]
  for name in ("arithmetic", "notes"):
    ppl = results["perplexity"][name]
    assert ppl["tokens"] > 0 and 1.0 < ppl["perplexity"] < 3 * vocab  # an untrained model: about uniform
  task = results["tasks"]["arithmetic"]
  assert task["num_problems"] == 3 and task["k"] == 2 and 0.0 <= task["avg@2"] <= task["pass@2"] <= 1.0
  assert task["temperature"] == 0.6 and task["top_p"] == 0.95 and task["difficulties"] == [0, 1]
  assert len(task["examples"]) == 6 and all(e["finish"] in ("eos", "length") for e in task["examples"])


def test_bad_input_fails_before_compiling(run_dir, monkeypatch, tmp_path):
  import nanbeige_jax.eval as ev
  from nanbeige_jax.data.tokenizer import Tokenizer

  def must_not_run(*args, **kwargs):
    raise AssertionError("evaluation started despite bad input")
  monkeypatch.setattr(ev, "perplexity", must_not_run)
  monkeypatch.setattr(ev, "generate_samples", must_not_run)
  with pytest.raises(ValueError, match="unknown stop token '<eot>'"):
    ev.run_eval(small_eval(run_dir, stop_tokens=("<eot>",)))
  with pytest.raises(ValueError, match=r"prompt of \d+ tokens \+ max_new_tokens=500 exceeds the cache length 512"):
    ev.run_eval(small_eval(run_dir, max_new_tokens=500))
  other = Tokenizer.train(["a different corpus entirely, with other words"] * 50, tmp_path / "other", 300)
  with pytest.raises(ValueError, match="tokenizer fingerprint"):
    ev.run_eval(small_eval(run_dir, tokenizer_path=str(tmp_path / "other.model")))
  small_dir = tmp_path / "small_vocab"
  small_dir.mkdir()
  write_run(small_dir, Tokenizer.load(run_dir / "tokenizer.model"), 256, None)  # no fingerprint recorded
  with pytest.raises(ValueError, match="has 400 pieces but the checkpoint's model vocab_size is 256"):
    ev.run_eval(small_eval(small_dir))
  with pytest.raises(ValueError, match="does not exist"):
    ev.run_eval(small_eval(run_dir, checkpoint_dir=str(tmp_path / "nowhere")))
  for bad in (dict(num_samples=0), dict(prompt_format="xml"), dict(tasks=("gsm8k",)), dict(top_p=1.5)):
    with pytest.raises(ValueError):
      small_eval(run_dir, **bad)
  for bad in ((4,), (), 1):
    with pytest.raises(ValueError, match="EvalConfig.difficulties"):
      small_eval(run_dir, difficulties=bad)


def test_arithmetic_items_follow_the_sft_prompt_and_difficulties(run_dir):
  """Chat prompts end with the SFT data's instruction; the problems are the held-out ones of the asked levels."""
  from nanbeige_jax.data.chat_template import user_prompt
  from nanbeige_jax.data.sft_data import ARITHMETIC_INSTRUCTION
  from nanbeige_jax.data.tasks import arithmetic
  from nanbeige_jax.data.tokenizer import Tokenizer
  from nanbeige_jax.eval import arithmetic_items
  tokenizer = Tokenizer.load(run_dir / "tokenizer.model")
  items = arithmetic_items(tokenizer, 5, "chat", difficulties=(0,))
  problems = arithmetic.generate("heldout", 5, difficulties=(0,))
  assert [item.id for item in items] == [p.id for p in problems]
  assert [item.answer for item in items] == [str(p.answer) for p in problems]
  assert items[0].prompt_ids == user_prompt(problems[0].question + ARITHMETIC_INSTRUCTION, tokenizer)


def test_eval_and_sampler_run_at_the_checkpoints_rope_theta(run_dir, tmp_path):
  """Issue 11 item 1: a checkpoint trained at base 1e6 (its preset says 5e6) is evaluated and sampled at 1e6."""
  import shutil

  from nanbeige_jax.data.tokenizer import Tokenizer
  from nanbeige_jax.eval import run_eval
  from nanbeige_jax.generate import load_model
  workdir = tmp_path / "abf_run"
  workdir.mkdir()
  shutil.copy(run_dir / "tokenizer.model", workdir / "tokenizer.model")
  tokenizer = Tokenizer.load(workdir / "tokenizer.model")
  from nanbeige_jax.data.tokenizer import padded_vocab_size
  write_run(workdir, tokenizer, padded_vocab_size(tokenizer.vocab_size), tokenizer.fingerprint(), rope_theta=1e6)
  model, metadata, _ = load_model(workdir / "checkpoints", tokenizer=tokenizer)
  assert metadata["rope_theta"] == 1e6 and metadata["model_config"]["rope_theta"] == 1e6
  assert model.cfg.rope_theta == 1e6  # the Sampler built on it (rope_theta=None) runs at the model's base
  evaluate = lambda **kw: run_eval(small_eval(workdir, tasks=(), ppl_max_batches=1, output=str(tmp_path / "o.json"),
                                              **kw))  # noqa: E731
  default, at_1e6, at_5e6 = evaluate(), evaluate(rope_theta=1e6), evaluate(rope_theta=5e6)
  assert default["rope_theta"] == 1e6
  assert default["perplexity"] == at_1e6["perplexity"] != at_5e6["perplexity"]
