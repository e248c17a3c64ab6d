"""Data refinement: verdict/checklist parsing, the critique/revise loop and CoT reconstruction against a real
OpenAI-compatible HTTP server on loopback (retries, errors, timeouts, verifier drops), the loop on a tiny local
checkpoint served by the generation engine, and the launcher end to end."""
import http.server
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nanbeige_jax.data.sft_data import JsonlChatSource, render_conversation
from nanbeige_jax.refine import (Instruction, ModelError, OpenAIChatModel, RefineConfig, Roles,
                                 arithmetic_instructions, parse_checklist, parse_verdicts, refine_to_jsonl)
from nanbeige_jax.refine.parsing import FAIL, MISSING, PASS

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------
def test_parse_checklist_forms():
  text = ("Here is the checklist:\n1. The final answer is correct.\n2) Every step is shown\n"
          "- **Consistency**: no contradictions\n* Safe content\n**5.** Executable code\n3: every step is shown\n"
          "\nThat's all.")
  assert parse_checklist(text) == ["The final answer is correct.", "Every step is shown",
                                   "Consistency: no contradictions", "Safe content", "Executable code"]
  assert parse_checklist(text, max_items=2) == ["The final answer is correct.", "Every step is shown"]
  assert parse_checklist("no list here at all") == []


def test_parse_verdicts_robust_and_strict():
  checklist = ["correct", "complete", "consistent"]
  reply = ("**ITEM 1:** PASS\n- item 2 - FAIL - wrong sum: 3 + 4 = 7, not 8\nVerdict 3: pass\n"
           "ITEM 9: FAIL - not an item\nCRITIQUE: fix the sum\nand restate the total")
  ev = parse_verdicts(reply, checklist)
  assert [v.verdict for v in ev.verdicts] == [PASS, FAIL, PASS]
  assert ev.verdicts[1].note == "wrong sum: 3 + 4 = 7, not 8"
  assert ev.critique == "fix the sum\nand restate the total"
  assert not ev.passed and [v.item for v in ev.failures()] == ["complete"]
  assert parse_verdicts("ITEM 1: PASS\nITEM 2: PASS\nITEM 3: PASS", checklist).passed
  assert parse_verdicts("item 1: pass. \n #2) PASS\n3. Pass", checklist).passed
  # Missing items never pass; the last verdict for an item wins; unreadable replies fail everything.
  partial = parse_verdicts("ITEM 1: PASS\nITEM 3: PASS", checklist)
  assert [v.verdict for v in partial.verdicts] == [PASS, MISSING, PASS] and not partial.passed
  assert parse_verdicts("ITEM 2: PASS\nITEM 1: PASS\nITEM 3: PASS\nITEM 2: FAIL - on reflection", checklist
                        ).verdicts[1].verdict == FAIL
  assert not parse_verdicts("Looks great, all criteria are met!", checklist).passed
  assert not parse_verdicts("ITEM 1: PASSABLE\nITEM 2: PASS\nITEM 3: PASS", checklist).passed
  assert not parse_verdicts("", []).passed


# --------------------------------------------------------------------------------------------------------------
# A scripted teacher behind a real OpenAI-compatible HTTP server on 127.0.0.1
# --------------------------------------------------------------------------------------------------------------
class Teacher:
  """Answers by role (the ``[refine:<role>]`` tag of the system prompt). Drafts are wrong; the evaluator fails an
  answer lacking the gold answer (except for questions in ``lenient``, which it always passes); the reviser fixes
  the answer. ``fail_first`` questions get one HTTP 503 before succeeding; ``reject`` questions get HTTP 400;
  ``slow`` questions sleep past the client's timeout."""

  def __init__(self, answers):
    self.answers = answers               # question -> gold answer
    self.lenient, self.fail_first, self.reject, self.slow = set(), set(), set(), set()
    self.requests, self.failed_once, self.auth = [], set(), set()

  def question_of(self, text):
    for q in self.answers:
      if q in text:
        return q
    return None

  def reply(self, messages):
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    role = re.match(r"\[refine:(\w+)\]", system)
    role = role.group(1) if role else "drafter"
    user = messages[-1]["content"]
    q = self.question_of(user)
    gold = self.answers.get(q)
    if role == "checklist":
      return "Checklist:\n1. The final answer is correct.\n2. The steps are shown."
    if role == "drafter":
      return "I think it is small.\nThe answer is 0."
    if role == "evaluator":
      answer = user.split("Answer:\n", 1)[1]
      if q in self.lenient or f"The answer is {gold}." in answer:
        return "ITEM 1: PASS\nITEM 2: PASS\nCRITIQUE: none"
      return f"ITEM 1: FAIL - the total is not 0\nITEM 2: PASS\nCRITIQUE: recompute; it should be {gold}"
    if role == "reviser":
      return f"Recomputing step by step.\nThe answer is {gold}."
    if role == "cot":
      if "Summary:" in user:   # the reasoning trace, written after the summary
        return f"The answer {gold} follows from the question."
      return f"First restate the quantities.\nThen combine them to get {gold}."
    raise AssertionError(role)


@pytest.fixture()
def teacher_server():
  items = arithmetic_instructions(4, seed=1)
  teacher = Teacher({it.prompt.split("\nEnd with")[0]: it.answer for it in items})

  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def do_POST(self):
      if self.path != "/v1/chat/completions":
        self.send_error(404)
        return
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      teacher.requests.append(body)
      teacher.auth.add(self.headers.get("Authorization"))
      q = teacher.question_of(body["messages"][-1]["content"])
      if q in teacher.reject:
        self.send_error(400, "bad request")
        return
      if q in teacher.fail_first and q not in teacher.failed_once:
        teacher.failed_once.add(q)
        self.send_error(503, "overloaded")
        return
      if q in teacher.slow:
        time.sleep(0.6)
      payload = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                "role": "assistant", "content": teacher.reply(body["messages"])}}]}).encode()
      self.send_response(200)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(payload)))
      self.end_headers()
      self.wfile.write(payload)

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}", teacher, items
  server.shutdown()
  server.server_close()


def test_refinement_loop_against_http_teacher(teacher_server, tmp_path):
  url, teacher, items = teacher_server
  questions = [it.prompt.split("\nEnd with")[0] for it in items]
  teacher.fail_first.add(questions[1])      # one 503, then fine (retried)
  teacher.lenient.add(questions[2])         # the judge passes the wrong draft: the verifier must drop it
  teacher.reject.add(questions[3])          # HTTP 400: a model error, dropped and counted
  model = OpenAIChatModel(url, "teacher", api_key="sk-test", timeout_s=5, max_retries=2, backoff_s=0.01)
  out = tmp_path / "refined.jsonl"
  stats = refine_to_jsonl(items, Roles.single(model), RefineConfig(max_rounds=3), out)
  assert teacher.auth == {"Bearer sk-test"} and {r["model"] for r in teacher.requests} == {"teacher"}
  assert questions[1] in teacher.failed_once
  assert (stats["items"], stats["written"], stats["dropped_verify"], stats["dropped_model_error"],
          stats["dropped_checklist"]) == (4, 2, 1, 1, 0)
  assert "HTTP 400" in stats["errors"][items[3].id]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["id"] for r in records] == [items[0].id, items[1].id]
  for record, item in zip(records, items):
    user, assistant = record["messages"]
    assert user == {"role": "user", "content": item.prompt}
    assert assistant["content"] == f"Recomputing step by step.\nThe answer is {item.answer}."
    assert assistant["reasoning"] == f"The answer {item.answer} follows from the question."
    prov = record["provenance"]
    assert prov["checklist"] == ["The final answer is correct.", "The steps are shown."]
    assert prov["draft"] == "I think it is small.\nThe answer is 0."
    assert [r["passed"] for r in prov["rounds"]] == [False, True]       # critique -> revise -> pass
    assert prov["rounds"][0]["verdicts"][0] == {"item": "The final answer is correct.", "verdict": "FAIL",
                                                "note": "the total is not 0"}
    assert prov["rounds"][0]["critique"] == f"recompute; it should be {item.answer}"
    assert prov["summary"].startswith("First restate") and prov["verification"]["correct"]
  # The output is SFT data: it loads and renders with the <think> span learned.
  source = JsonlChatSource("refined", out, eval_fraction=0.0)
  messages = source.conversation(0)
  assert messages[-1]["reasoning"] and json.loads((tmp_path / "refined.jsonl.stats.json").read_text())["written"] == 2


def test_http_client_errors(teacher_server):
  url, teacher, items = teacher_server
  question = items[0].prompt.split("\nEnd with")[0]
  teacher.slow.add(question)
  slow = OpenAIChatModel(url + "/v1", "teacher", timeout_s=0.2, max_retries=1, backoff_s=0.0)
  with pytest.raises(ModelError, match="no reply after 2 attempts"):
    slow.complete([[{"role": "user", "content": question}]])
  with pytest.raises(ModelError, match="connect|refused|no reply"):
    OpenAIChatModel("http://127.0.0.1:9", "m", timeout_s=1, max_retries=0).complete([[{"role": "user",
                                                                                         "content": "hi"}]])
  with pytest.raises(ModelError, match="malformed"):
    OpenAIChatModel(url, "m")._parse(b'{"choices": []}')
  with pytest.raises(ValueError, match="http"):
    OpenAIChatModel("ftp://x", "m")


def test_launcher_against_http_teacher(teacher_server, tmp_path):
  url, teacher, items = teacher_server
  out = tmp_path / "cli.jsonl"
  proc = subprocess.run([sys.executable, str(REPO / "launch/refine_sft_data.py"), "--task", "arithmetic",
                         "--num_items", "4", "--seed", "1", "--model", "openai:teacher", "--base_url", url,
                         "--output", str(out), "--max_rounds", "2"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "done: 4/4 items kept" in proc.stdout
  assert len(out.read_text().splitlines()) == 4
  bad = subprocess.run([sys.executable, str(REPO / "launch/refine_sft_data.py"), "--task", "arithmetic",
                        "--model", "openai:teacher", "--output", str(out)], capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode != 0 and "needs --base_url" in bad.stderr


# --------------------------------------------------------------------------------------------------------------
# A tiny local checkpoint behind the generation engine
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  from flax import nnx

  from nanbeige_jax.checkpoint import build_metadata, save_params_checkpoint
  from nanbeige_jax.data.tokenizer import Tokenizer
  from nanbeige_jax.model import Decoder, get_preset
  run = tmp_path_factory.mktemp("tiny_run")
  text = "\n".join(f"Question {i}: what is {i} plus {i + 1}? The answer is {2 * i + 1}." for i in range(300))
  tok = Tokenizer.train([text], run / "tok", 320)
  (run / "tok.model").rename(run / "tokenizer.model")
  tok = Tokenizer.load(run / "tokenizer.model")
  cfg = get_preset("test", vocab_size=384)
  params = nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  save_params_checkpoint(run / "checkpoints", params,
                         build_metadata(cfg, stage="sft_test", tokenizer_fingerprint=tok.fingerprint()))
  return run


def test_refinement_loop_on_local_checkpoint(tiny_checkpoint, tmp_path):
  from nanbeige_jax.refine import build_chat_model
  model = build_chat_model(f"checkpoint:{tiny_checkpoint}", max_tokens=12, temperature=0.8, batch_size=4)
  assert model.describe().startswith("checkpoint:")
  items = arithmetic_instructions(2, seed=0) + [Instruction(id="open", messages=(
      {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Write a line about rivers."}))]
  out = tmp_path / "local.jsonl"
  stats = refine_to_jsonl(items, Roles.single(model), RefineConfig(max_rounds=2, drop_unpassed=False), out)
  # An untrained model never writes a readable verdict: every item runs the full loop, the verifiable ones then
  # fail the verifier and are dropped, the open-ended one is kept with its reconstructed reasoning.
  assert stats["rounds"] == 2 * 3 and stats["passed_checklist"] == 0 and stats["default_checklist"] >= 0
  assert (stats["written"], stats["dropped_verify"], stats["dropped_model_error"]) == (1, 2, 0)
  record = json.loads(out.read_text())
  assert record["id"] == "open" and record["messages"][:2] == list(items[2].messages)
  assert len(record["provenance"]["rounds"]) == 2
  assert all(v["verdict"] == MISSING for r in record["provenance"]["rounds"] for v in r["verdicts"])
  assert record["provenance"]["models"]["evaluator"] == model.describe()
  conv = render_conversation(record["messages"], model.tokenizer, max_len=4096)
  assert conv is not None and np.sum(conv.weights) > 0
