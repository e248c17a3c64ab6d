"""Fault injection: kill (SIGKILL) or preempt (SIGTERM) ``launch/pretrain.py`` at random steps, resume, and check
that every resumed run's per-step losses equal an uninterrupted run's bit for bit.

  python benchmarks/faults.py [--trials 4] [--seed 0] [--workdir /tmp/nanbeige_faults] [--devices 2]

One reference run, then per trial: a run interrupted after a random step k (the signal is sent as soon as
``metrics.jsonl`` shows step k, so it lands anywhere in the following step or checkpoint write), then a restart
from the same workdir that runs to the end. A trial is exact when the final ``metrics.jsonl`` holds every step once
and each step's loss and grad-norm equal the reference's (compared as the exact floats JSON stores). For SIGTERM
the script also checks exit status 0, that the latest checkpoint is the last logged step, and reports the time from
the signal to the process exit. Prints one summary line:

  faults: 4/4 trials resumed exactly (kill 2/2, preempt 2/2); SIGTERM->exit max 3.1 s

The model is the "test" preset with a 384-piece tokenizer on a tiny corpus (an arithmetic source and a JSONL file
written here), 16 steps of 4 x 32 tokens, a checkpoint every 2 steps: small enough for a 2-core CPU. The helpers
are shared with ``tests/test_faults.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "launch" / "pretrain.py"
TOTAL_STEPS = 16


def write_corpus(directory: pathlib.Path, *, num_docs: int = 200, bad_lines: Sequence[int] = ()) -> pathlib.Path:
  """A JSONL file of short word-salad documents (deterministic); ``bad_lines`` (1-based) are malformed JSON."""
  rng = random.Random(0)
  words = ("the of and to in is was for on that with as by at from his her it an be this which are or "
           "king queen sword river stone light night day").split()
  path = directory / ("corpus_bad.jsonl" if bad_lines else "corpus.jsonl")
  lines = []
  for i in range(1, num_docs + 1):
    if i in bad_lines:
      lines.append('{"text": "cut short')
    else:
      lines.append(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))}))
  path.write_text("\n".join(lines) + "\n")
  return path


def train_test_tokenizer(directory: pathlib.Path, corpus: pathlib.Path, vocab_size: int = 384) -> pathlib.Path:
  """A small sentencepiece model over the arithmetic source and the corpus (in-process, a few seconds)."""
  from nanbeige_jax.data.sources import build_source
  from nanbeige_jax.data.tokenizer import Tokenizer
  arithmetic = build_source("arithmetic", "a", num_train=300, num_eval=20)
  texts = arithmetic.split_documents("train")[:200]
  texts += [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]
  Tokenizer.train(texts, directory / "tok", vocab_size)
  return directory / "tok.model"


def bindings(tokenizer: pathlib.Path, corpus: pathlib.Path, **overrides: Any) -> list[str]:
  """Gin bindings of the small fault-test run; ``overrides`` are extra ``PretrainConfig`` fields (python values)."""
  sources = {"a": {"kind": "arithmetic", "num_train": 300, "num_eval": 20},
             "b": {"kind": "jsonl", "paths": str(corpus)}}
  out = [
      "PretrainConfig.model_preset = 'test'",
      "PretrainConfig.model_overrides = {'vocab_size': 384}",
      f"PretrainConfig.sources = {sources!r}",
      # 4 x 32 = 128 tokens per step: warmup 2 steps, s1 6, s2 4, decay 4 = 16 steps; mixture switch at step 8.
      "FGWSDSchedule.warmup_tokens = 256",
      "FGWSDSchedule.stable_phases = [{'name': 's1', 'tokens': 768, 'mixture': {'a': 0.5, 'b': 0.5}}, "
      "{'name': 's2', 'tokens': 512, 'mixture': {'a': 0.8, 'b': 0.2}}]",
      "FGWSDSchedule.decay_tokens = 512",
      "FGWSDSchedule.decay_phases = []",
      "PretrainConfig.seq_len = 32",
      "PretrainConfig.global_batch_size = 4",
      f"PretrainConfig.tokenizer_path = {str(tokenizer)!r}",
      "PretrainConfig.log_every_steps = 1",
      "PretrainConfig.checkpoint_every_steps = 2",
      "PretrainConfig.keep_checkpoints = 3",
      "PretrainConfig.eval_every_steps = 1000",
      "PretrainConfig.eval_batches = 1",
      "PretrainConfig.plot = False",
  ]
  out += [f"PretrainConfig.{k} = {v!r}" for k, v in overrides.items()]
  return out


def command(workdir: pathlib.Path, gin_bindings: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
  cmd = [sys.executable, str(LAUNCHER), "--workdir", str(workdir)]
  for b in gin_bindings:
    cmd += ["--gin_param", b]
  return cmd + list(extra)


def subprocess_env(devices: int = 2) -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def run(workdir: pathlib.Path, gin_bindings: Sequence[str], extra: Sequence[str] = (), *, timeout: float = 300,
        devices: int = 2) -> subprocess.CompletedProcess:
  """Run the launcher to completion (or failure); stdout/stderr captured as text."""
  return subprocess.run(command(workdir, gin_bindings, extra), cwd=REPO, env=subprocess_env(devices),
                        capture_output=True, text=True, timeout=timeout)


def logged_steps(workdir: pathlib.Path) -> list[int]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  steps = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue  # a line being written
    if "loss" in row:
      steps.append(int(row["step"]))
  return steps


def run_interrupted(workdir: pathlib.Path, gin_bindings: Sequence[str], after_step: int, sig: int, *,
                    timeout: float = 300, devices: int = 2) -> dict[str, Any]:
  """Start the launcher, send ``sig`` as soon as metrics.jsonl logs a step >= ``after_step``, wait for the exit.
  Returns {"returncode", "signal_step" (last logged step when the signal was sent), "exit_seconds", "stderr"}."""
  log_path = workdir.parent / f"{workdir.name}.{signal.Signals(sig).name}.{after_step}.log"
  with open(log_path, "w") as log_file:
    proc = subprocess.Popen(command(workdir, gin_bindings), cwd=REPO, env=subprocess_env(devices),
                            stdout=log_file, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    try:
      while True:
        steps = logged_steps(workdir)
        if steps and max(steps) >= after_step:
          break
        if proc.poll() is not None:
          raise RuntimeError(f"the run exited ({proc.returncode}) before step {after_step}: "
                             f"{log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
          raise TimeoutError(f"step {after_step} not reached within {timeout} s")
        time.sleep(0.02)
      signal_step = max(steps)
      sent = time.monotonic()
      proc.send_signal(sig)
      returncode = proc.wait(timeout=max(deadline - time.monotonic(), 1))
      exit_seconds = time.monotonic() - sent
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return {"returncode": returncode, "signal_step": signal_step, "exit_seconds": exit_seconds,
          "output": log_path.read_text()}


def step_records(workdir: pathlib.Path) -> dict[int, tuple[float, float]]:
  """step -> (loss, grad_norm) from metrics.jsonl; raises if a step is logged twice (resume must drop old rows)."""
  records: dict[int, tuple[float, float]] = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "loss" not in row:
      continue
    step = int(row["step"])
    if step in records:
      raise AssertionError(f"{workdir / 'metrics.jsonl'}: step {step} is logged twice")
    records[step] = (row["loss"], row["grad_norm"])
  return records


def same_records(a: dict[int, tuple[float, float]], b: dict[int, tuple[float, float]]) -> bool:
  """Bit-for-bit equality of two step -> (loss, grad_norm) maps (NaN equals NaN)."""
  if sorted(a) != sorted(b):
    return False
  same = lambda x, y: x == y or (x != x and y != y)  # noqa: E731
  return all(same(a[s][0], b[s][0]) and same(a[s][1], b[s][1]) for s in a)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
  """The launcher's last stderr line of a failed run: one ``error: ...`` or ``stopped: ...`` line."""
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode != 0
  assert lines and lines[-1].startswith(("error: ", "stopped: ")), proc.stderr[-2000:]
  return lines[-1]


def latest_checkpoint(workdir: pathlib.Path) -> int | None:
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  return max(steps) if steps else None


def trial(base: pathlib.Path, name: str, gin_bindings: Sequence[str], reference: dict, after_step: int, sig: int,
          *, devices: int = 2) -> dict[str, Any]:
  """Interrupt at ``after_step`` with ``sig``, resume to the end, compare with ``reference``."""
  workdir = base / name
  shutil.rmtree(workdir, ignore_errors=True)
  interrupted = run_interrupted(workdir, gin_bindings, after_step, sig, devices=devices)
  result = {"signal": signal.Signals(sig).name, "after_step": interrupted["signal_step"],
            "exit_seconds": interrupted["exit_seconds"], "returncode": interrupted["returncode"],
            "checkpoint": latest_checkpoint(workdir) if (workdir / "checkpoints").exists() else None}
  ok = True
  if sig == signal.SIGTERM:
    # Clean exit, with a checkpoint of the last step that was logged (nothing trained is lost).
    ok = interrupted["returncode"] == 0 and result["checkpoint"] == max(logged_steps(workdir))
  resumed = run(workdir, gin_bindings, devices=devices)
  result["resume_returncode"] = resumed.returncode
  try:
    records = step_records(workdir)
  except (AssertionError, FileNotFoundError) as e:
    records, result["error"] = {}, str(e)
  result["exact"] = bool(ok and resumed.returncode == 0 and same_records(records, reference))
  if not result["exact"]:
    result["output_tail"] = (interrupted["output"][-1500:], resumed.stderr[-1500:])
  return result


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--trials", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="/tmp/nanbeige_faults")
  parser.add_argument("--devices", type=int, default=2, help="fake CPU devices per run (the mesh's fsdp axis)")
  args = parser.parse_args(argv)
  base = pathlib.Path(args.workdir)
  shutil.rmtree(base, ignore_errors=True)
  base.mkdir(parents=True)
  corpus = write_corpus(base)
  tokenizer = train_test_tokenizer(base, corpus)
  gin_bindings = bindings(tokenizer, corpus)
  t0 = time.monotonic()
  ref = run(base / "reference", gin_bindings, devices=args.devices)
  if ref.returncode != 0:
    print(ref.stderr[-3000:], file=sys.stderr)
    return 2
  reference = step_records(base / "reference")
  print(f"reference: {len(reference)} steps in {time.monotonic() - t0:.0f} s", flush=True)
  rng = random.Random(args.seed)
  results = []
  for i in range(args.trials):
    sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
    after = rng.randint(1, TOTAL_STEPS - 2)
    r = trial(base, f"trial{i}", gin_bindings, reference, after, sig, devices=args.devices)
    results.append(r)
    print(f"trial {i}: {r['signal']} after step {r['after_step']} (checkpoint {r['checkpoint']}, exit "
          f"{r['returncode']} in {r['exit_seconds']:.1f} s) -> resumed {'exactly' if r['exact'] else 'WRONG'}",
          flush=True)
    if not r["exact"]:
      print(json.dumps(r, indent=1), file=sys.stderr)
  exact = sum(r["exact"] for r in results)
  by = lambda s: (sum(r["exact"] for r in results if r["signal"] == s),  # noqa: E731
                  sum(r["signal"] == s for r in results))
  term = [r["exit_seconds"] for r in results if r["signal"] == "SIGTERM"]
  term_txt = f"; SIGTERM->exit max {max(term):.1f} s" if term else ""
  print(f"faults: {exact}/{len(results)} trials resumed exactly (kill {'/'.join(map(str, by('SIGKILL')))}, "
        f"preempt {'/'.join(map(str, by('SIGTERM')))}){term_txt}")
  return 0 if exact == len(results) else 1


if __name__ == "__main__":
  sys.path.insert(0, str(REPO))
  sys.exit(main())
