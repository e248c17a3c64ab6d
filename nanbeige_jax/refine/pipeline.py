"""The refinement pipeline (paper 3.3 deliberative generation refinement, 3.4 CoT reconstruction).

For each instruction (a prompt, optionally earlier turns, optionally a gold answer for verifiable items):

1. **Checklist**: the checklist model writes instruction-specific criteria (correctness, completeness,
   consistency, executability, safety, ...) as a numbered list (``parsing.parse_checklist``); if it yields none,
   ``RefineConfig.default_checklist`` is used (recorded in the provenance).
2. **Draft**: the drafter answers the instruction.
3. **Critique -> revise**: the evaluator judges the current answer against the checklist in the structured format
   ``ITEM <n>: PASS|FAIL - why`` + ``CRITIQUE: ...`` (``parsing.parse_verdicts``; an unreadable verdict is a
   failure); if any item fails, the reviser rewrites the answer from the critique and the failed items. Repeat
   until every item passes or ``max_rounds`` evaluations were made. Items that never pass are dropped
   (``drop_unpassed``) and counted.
4. **CoT reconstruction**: given the prompt and the final answer, the CoT model first writes a short summary of
   the solution, then a step-by-step reasoning trace that leads to that answer. The SFT target is the assistant
   turn ``{"reasoning": trace, "content": final answer}``, i.e. ``<think>`` trace ``</think>`` + answer in the
   chat template.
5. **Verification**: items with a gold answer are checked with math-verify (``rewards.math_verify``) on the final
   answer; failures are dropped and counted.

Every stage is batched across items (one model call per role per round for all items still in the loop), so a
local checkpoint samples efficiently. Each role's system prompt starts with ``[refine:<role>]``.
Output: one JSONL record per kept item, ``{"id", "messages", "provenance"}`` where ``provenance`` holds the models,
checklist, every round (answer, verdicts, critique, raw evaluator reply), the summary and the verification; a
``<output>.stats.json`` with the counts. Files are written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Sequence

from nanbeige_jax.refine.models import ChatModel, ModelError
from nanbeige_jax.refine.parsing import Evaluation, parse_checklist, parse_verdicts

DEFAULT_CHECKLIST = ("The final answer is correct.", "The solution is complete and answers every part of the "
                     "question.", "The reasoning is consistent with the final answer.")
ROLES = ("checklist", "drafter", "evaluator", "reviser", "cot")


@dataclasses.dataclass(frozen=True)
class Instruction:
  id: str
  messages: tuple[dict[str, str], ...]   # conversation so far, ending with the user turn to answer
  answer: str | None = None              # gold answer (verifiable items)
  source: str = ""

  @property
  def prompt(self) -> str:
    return self.messages[-1]["content"]


@dataclasses.dataclass(frozen=True)
class RefineConfig:
  max_rounds: int = 3                    # evaluations per item (the first judges the draft)
  max_checklist_items: int = 6
  default_checklist: tuple[str, ...] = DEFAULT_CHECKLIST
  drop_unpassed: bool = True             # drop items whose checklist never passed within max_rounds
  verify_timeout_s: float = 5.0

  def __post_init__(self):
    if not isinstance(self.max_rounds, int) or self.max_rounds < 1:
      raise ValueError(f"RefineConfig.max_rounds: expected an int >= 1, found {self.max_rounds!r}")
    if not isinstance(self.max_checklist_items, int) or self.max_checklist_items < 1:
      raise ValueError(f"RefineConfig.max_checklist_items: expected an int >= 1, found {self.max_checklist_items!r}")
    if not self.default_checklist:
      raise ValueError("RefineConfig.default_checklist: expected at least one item")


@dataclasses.dataclass
class Roles:
  checklist: ChatModel
  drafter: ChatModel
  evaluator: ChatModel
  reviser: ChatModel
  cot: ChatModel

  @classmethod
  def single(cls, model: ChatModel) -> "Roles":
    return cls(model, model, model, model, model)

  def describe(self) -> dict[str, str]:
    return {role: getattr(self, role).describe() for role in ROLES}


# --- prompts ---------------------------------------------------------------------------------------------------
def _system(role: str, text: str) -> dict[str, str]:
  return {"role": "system", "content": f"[refine:{role}] {text}"}


def checklist_prompt(item: Instruction) -> list[dict[str, str]]:
  return [_system("checklist", "You write evaluation checklists. List 2-6 concrete, checkable criteria a perfect "
                  "answer to the user's instruction must meet (correctness, completeness, consistency, "
                  "executability, safety, as relevant), one per line, numbered 1., 2., ... Output only the list."),
          {"role": "user", "content": f"Instruction:\n{item.prompt}"}]


def draft_prompt(item: Instruction) -> list[dict[str, str]]:
  return list(item.messages)


def evaluation_prompt(item: Instruction, checklist: Sequence[str], answer: str) -> list[dict[str, str]]:
  numbered = "\n".join(f"{i}. {c}" for i, c in enumerate(checklist, start=1))
  return [_system("evaluator", "You are a strict evaluator. Judge the answer against every checklist item. Reply "
                  "with exactly one line per item, 'ITEM <n>: PASS' or 'ITEM <n>: FAIL - <reason>', then one line "
                  "'CRITIQUE: <what must change>'."),
          {"role": "user", "content": f"Instruction:\n{item.prompt}\n\nChecklist:\n{numbered}\n\nAnswer:\n{answer}"}]


def revision_prompt(item: Instruction, answer: str, evaluation: Evaluation) -> list[dict[str, str]]:
  failed = "\n".join(f"- {v.item}: {v.note or v.verdict}" for v in evaluation.failures())
  return [_system("reviser", "You revise answers. Rewrite the answer so that it fixes every failed checklist item "
                  "and follows the critique, keeping what was right. Output only the revised answer."),
          {"role": "user", "content": f"Instruction:\n{item.prompt}\n\nCurrent answer:\n{answer}\n\nFailed items:\n"
                                      f"{failed}\n\nCritique:\n{evaluation.critique or '(none)'}"}]


def summary_prompt(item: Instruction, answer: str) -> list[dict[str, str]]:
  return [_system("cot", "Summarise in two or three sentences how the given final answer is obtained. Output only "
                  "the summary."),
          {"role": "user", "content": f"Instruction:\n{item.prompt}\n\nFinal answer:\n{answer}"}]


def cot_prompt(item: Instruction, answer: str, summary: str) -> list[dict[str, str]]:
  return [_system("cot", "Write the step-by-step reasoning a careful solver would think through to reach exactly "
                  "the given final answer, following the summary. Do not contradict the final answer. Output only "
                  "the reasoning."),
          {"role": "user", "content": f"Instruction:\n{item.prompt}\n\nSummary:\n{summary}\n\nFinal answer:\n"
                                      f"{answer}"}]


# --- the pipeline ----------------------------------------------------------------------------------------------
def _call(model: ChatModel, conversations: list[list[dict[str, str]]]) -> list[str | BaseException]:
  """Batched call; if the batch fails, item by item so one bad item does not sink the rest."""
  if not conversations:
    return []
  try:
    replies = model.complete(conversations)
    if len(replies) != len(conversations):
      raise ModelError(f"{model.describe()} returned {len(replies)} replies for {len(conversations)} prompts")
    return list(replies)
  except ModelError:
    if len(conversations) == 1:
      raise
  out: list[str | BaseException] = []
  for conversation in conversations:
    try:
      out.append(model.complete([conversation])[0])
    except ModelError as e:
      out.append(e)
  return out


def refine_items(items: Sequence[Instruction], roles: Roles, cfg: RefineConfig
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Refine a batch of instructions -> (kept records, stats). Model failures drop the item (counted)."""
  from nanbeige_jax.rewards.math_verify import check_answer
  stats = {"items": len(items), "written": 0, "dropped_model_error": 0, "dropped_checklist": 0,
           "dropped_verify": 0, "passed_checklist": 0, "rounds": 0, "default_checklist": 0}
  prov: dict[str, dict[str, Any]] = {it.id: {"models": roles.describe(), "rounds": []} for it in items}
  alive = {it.id: it for it in items}
  errors: dict[str, str] = {}

  def fail(item_id: str, error: BaseException, stage: str) -> None:
    errors[item_id] = f"{stage}: {error}"
    alive.pop(item_id, None)

  def run(model: ChatModel, build: Callable[[Instruction], list[dict[str, str]]], stage: str,
          ids: Sequence[str]) -> dict[str, str]:
    replies = _call(model, [build(alive[i]) for i in ids])
    out = {}
    for item_id, reply in zip(ids, replies):
      if isinstance(reply, BaseException):
        fail(item_id, reply, stage)
      else:
        out[item_id] = reply
    return out

  checklists: dict[str, list[str]] = {}
  for item_id, reply in run(roles.checklist, checklist_prompt, "checklist", list(alive)).items():
    checklist = parse_checklist(reply, cfg.max_checklist_items)
    prov[item_id]["checklist_raw"] = reply
    if not checklist:
      checklist = list(cfg.default_checklist)
      prov[item_id]["checklist_default"] = True
      stats["default_checklist"] += 1
    checklists[item_id] = prov[item_id]["checklist"] = checklist
  answers = run(roles.drafter, draft_prompt, "draft", list(alive))
  for item_id, draft in answers.items():
    prov[item_id]["draft"] = draft
  open_ids = [i for i in alive if i in answers]
  passed: dict[str, bool] = {i: False for i in open_ids}
  for round_number in range(1, cfg.max_rounds + 1):
    if not open_ids:
      break
    verdict_replies = run(roles.evaluator, lambda it: evaluation_prompt(it, checklists[it.id], answers[it.id]),
                          "evaluate", open_ids)
    to_revise = []
    for item_id, reply in verdict_replies.items():
      evaluation = parse_verdicts(reply, checklists[item_id])
      stats["rounds"] += 1
      prov[item_id]["rounds"].append({"round": round_number, "answer": answers[item_id], **evaluation.to_dict(),
                                      "evaluator_reply": reply})
      if evaluation.passed:
        passed[item_id] = True
      elif round_number < cfg.max_rounds:
        to_revise.append((item_id, evaluation))
    evaluations = dict(to_revise)
    revised = run(roles.reviser, lambda it: revision_prompt(it, answers[it.id], evaluations[it.id]), "revise",
                  [i for i, _ in to_revise])
    answers.update(revised)
    open_ids = list(revised)
  for item_id in list(alive):
    prov[item_id]["passed_checklist"] = passed.get(item_id, False)
    if passed.get(item_id):
      stats["passed_checklist"] += 1
    elif cfg.drop_unpassed:
      stats["dropped_checklist"] += 1
      alive.pop(item_id)
  finals = {i: answers[i].strip() for i in alive}
  summaries = run(roles.cot, lambda it: summary_prompt(it, finals[it.id]), "summary", list(alive))
  traces = run(roles.cot, lambda it: cot_prompt(it, finals[it.id], summaries[it.id]), "cot",
               [i for i in alive if i in summaries])
  records = []
  for item in items:
    if item.id not in alive or item.id not in traces:
      continue
    p = prov[item.id]
    p["summary"] = summaries[item.id]
    if item.answer is not None:
      check = check_answer(finals[item.id], item.answer, timeout_s=cfg.verify_timeout_s)
      p["verification"] = {"gold": item.answer, "correct": check.correct, "extracted": check.extracted,
                           "status": check.status}
      if not check.correct:
        stats["dropped_verify"] += 1
        continue
    assistant = {"role": "assistant", "reasoning": traces[item.id].strip(), "content": finals[item.id]}
    records.append({"id": item.id, "source": item.source, "messages": [*item.messages, assistant],
                    "provenance": p})
  stats["dropped_model_error"] = len(errors)
  stats["written"] = len(records)
  stats["errors"] = errors
  return records, stats


def refine_item(item: Instruction, roles: Roles, cfg: RefineConfig) -> tuple[dict[str, Any] | None, dict]:
  records, stats = refine_items([item], roles, cfg)
  return (records[0] if records else None), stats


def refine_to_jsonl(items: Sequence[Instruction], roles: Roles, cfg: RefineConfig, output: str | os.PathLike, *,
                    batch_size: int = 16, progress: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
  """Refine everything into ``output`` (JSONL, written atomically) and ``<output>.stats.json``; returns the stats."""
  output = pathlib.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = output.with_name(output.name + f".tmp.{os.getpid()}")
  totals: dict[str, Any] = {"errors": {}}
  try:
    with open(tmp, "w") as f:
      for start in range(0, len(items), batch_size):
        records, stats = refine_items(items[start:start + batch_size], roles, cfg)
        for record in records:
          f.write(json.dumps(record, ensure_ascii=False) + "\n")
        for key, value in stats.items():
          if key == "errors":
            totals["errors"].update(value)
          else:
            totals[key] = totals.get(key, 0) + value
        if progress is not None:
          progress(min(start + batch_size, len(items)), totals)
    os.replace(tmp, output)
  finally:
    if tmp.exists():
      tmp.unlink()
  totals["models"] = roles.describe()
  totals["config"] = dataclasses.asdict(cfg)
  stats_path = output.with_name(output.name + ".stats.json")
  stats_path.write_text(json.dumps(totals, indent=2))
  return totals


# --- inputs ----------------------------------------------------------------------------------------------------
def read_instructions(path: str | os.PathLike) -> list[Instruction]:
  """JSONL of ``{"prompt": str}`` or ``{"messages": [..., user turn]}``, optional ``"id"``, ``"answer"``,
  ``"source"``; errors name ``path:line``."""
  from nanbeige_jax.data.chat_template import validate_messages
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"instructions file {str(path)!r} does not exist")
  items = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}")
      if ("prompt" in record) == ("messages" in record):
        raise ValueError(f"{where}: expected exactly one of 'prompt' or 'messages'")
      messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
      try:
        validate_messages(messages)
      except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
      if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the conversation must end with the user turn to answer, found "
                         f"{messages[-1]['role']!r}")
      answer = record.get("answer")
      items.append(Instruction(id=str(record.get("id", f"{path.stem}-{number}")), messages=tuple(messages),
                               answer=None if answer is None else str(answer), source=str(record.get("source", ""))))
  if not items:
    raise ValueError(f"instructions file {str(path)!r} holds no records")
  ids = [it.id for it in items]
  duplicates = sorted({i for i in ids if ids.count(i) > 1})
  if duplicates:
    raise ValueError(f"{path}: duplicate ids {duplicates[:5]}")
  return items


def arithmetic_instructions(num_items: int, *, seed: int = 0, split: str = "train") -> list[Instruction]:
  """The built-in verifiable task as instructions (gold answers from the generator)."""
  from nanbeige_jax.data.sft_data import ARITHMETIC_INSTRUCTION
  from nanbeige_jax.data.tasks import arithmetic
  return [Instruction(id=p.id, messages=({"role": "user", "content": p.question + ARITHMETIC_INSTRUCTION},),
                      answer=str(p.answer), source="arithmetic")
          for p in arithmetic.generate(split, num_items, seed=seed)]
