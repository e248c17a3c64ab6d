"""Pre-training on prepared shards (``PretrainConfig.data_backend = 'prepared'``), end to end through the launchers:
``launch/prepare_data.py`` tokenizes a tiny corpus, ``launch/pretrain.py`` trains on it, is interrupted (SIGTERM)
and resumes with the same per-step losses as an uninterrupted run; 2 processes (jax.distributed on CPU, 4 devices
each) give the losses of 1 process with 8 devices, across a resume; bad input is a one-line error at pre-flight.

The run is ``benchmarks/faults.py``'s small run (``test`` model, 32-token rows) with its sources ``a`` and ``b``
read from ``<prepared_root>/{a,b}`` instead of raw text.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from nanbeige_jax.config import ConfigError, build, parse_gin
from processes import free_port, run_together

REPO = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("faults_harness", REPO / "benchmarks" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  base = tmp_path_factory.mktemp("prepared_run")
  corpus = faults.write_corpus(base)
  tokenizer = faults.train_test_tokenizer(base, corpus)
  lines = corpus.read_text().splitlines()
  (base / "a.jsonl").write_text("\n".join(lines[:100]) + "\n")
  (base / "b.jsonl").write_text("\n".join(lines[100:]) + "\n")
  root = base / "prepared"
  done = subprocess.run([sys.executable, str(REPO / "launch" / "prepare_data.py"), f"--source=a=jsonl:{base}/a.jsonl",
                         f"--source=b=jsonl:{base}/b.jsonl", f"--tokenizer={tokenizer}", f"--output_dir={root}",
                         "--documents_per_shard=16", "--num_workers=0", "--noprogress"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return {"base": base, "corpus": corpus, "tokenizer": tokenizer, "root": root}


def _bindings(prepared, **overrides):
  settings = {"data_backend": "prepared", "prepared_root": str(prepared["root"]), **overrides}
  return faults.bindings(prepared["tokenizer"], prepared["corpus"], **settings)


# 8 rows of 32 tokens per step on 8 devices (one process): warmup 1 step, s1 3, s2 2, decay 2 = 8 steps.
RUN = {"global_batch_size": 8}


@pytest.fixture(scope="module")
def reference(prepared):
  workdir = prepared["base"] / "reference"
  done = faults.run(workdir, _bindings(prepared, **RUN), devices=8)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir, faults.step_records(workdir)


def test_prepared_run_resumes_exactly(prepared, reference):
  workdir, records = reference
  assert sorted(records) == list(range(1, 9)) and len({loss for loss, _ in records.values()}) == 8
  assert (workdir / "tokenizer.model").read_bytes() == prepared["tokenizer"].read_bytes()
  result = faults.trial(prepared["base"], "sigterm", _bindings(prepared, **RUN), records, after_step=3,
                        sig=signal.SIGTERM, devices=8)
  assert result["exact"], result


def test_prepared_preflight_errors(prepared, tmp_path):
  from nanbeige_jax.train.pretrain import PretrainConfig, run_pretrain
  workdir = tmp_path / "run"
  parse_gin(["pretrain/tiny.gin"], _bindings(prepared, prepared_root=str(tmp_path / "nothing")))
  with pytest.raises(ConfigError, match=r"no prepared 'train' split of source 'a': .*nothing/a/train/index.json "
                                        r"does not exist"):
    run_pretrain(build(PretrainConfig), workdir)
  other = faults.train_test_tokenizer(tmp_path, prepared["corpus"], vocab_size=360)
  parse_gin(["pretrain/tiny.gin"], _bindings(prepared, tokenizer_path=str(other)))
  with pytest.raises(ConfigError, match="was tokenized with tokenizer=.* prepare it again with this tokenizer"):
    run_pretrain(build(PretrainConfig), workdir)
  assert not workdir.exists()  # pre-flight: nothing written
  for bad, match in (({"prepared_root": None}, "PretrainConfig.prepared_root: expected the prepare_data output"),
                     ({"data_backend": "native"}, "PretrainConfig.prepared_root is set")):
    parse_gin(["pretrain/tiny.gin"], _bindings(prepared, **bad))
    with pytest.raises(ConfigError, match=match):
      build(PretrainConfig)


def _two_processes(workdir: pathlib.Path, bindings: list[str]) -> None:
  env = faults.subprocess_env(devices=4)
  port = free_port()
  run_together([faults.command(workdir, bindings, [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                                    f"--process_id={i}"]) for i in range(2)],
               env=env, timeout=300, cwd=str(REPO), tail=3000)


def test_two_processes_match_one_process_across_a_resume(prepared, reference):
  """2 processes x 4 devices read 4 of the 8 rows each; the 2-process run stops after step 2 and resumes to step 4
  (both processes restore the same data state); its per-step losses are the 1-process run's with 8 devices (the
  gradients are summed across processes by gloo, in another order: rtol 1e-6)."""
  two = prepared["base"] / "two_processes"
  _two_processes(two, _bindings(prepared, max_steps=2, **RUN))
  assert max(faults.logged_steps(two)) == 2
  _two_processes(two, _bindings(prepared, max_steps=4, **RUN))
  ref, got = reference[1], faults.step_records(two)
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s][0] for s in range(1, 5)], [ref[s][0] for s in range(1, 5)], rtol=1e-6)
  summary = json.loads((two / "summary.json").read_text())
  assert summary["start_step"] == 2 and summary["final_step"] == 4
  assert os.path.isdir(two / "checkpoints" / "4")
