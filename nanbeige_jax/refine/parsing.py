"""Parsing the structured parts of role-model replies: checklists and evaluator verdicts.

Checklist reply: one criterion per line, numbered (``1.``, ``2)``, ``3:``) or bulleted (``-``, ``*``, ``•``);
markdown emphasis is stripped; anything else (preamble, blank lines) is ignored; duplicates are dropped.

Evaluator reply: one line per checklist item, ``ITEM <n>: PASS`` or ``ITEM <n>: FAIL - <why>`` (1-based), then
optionally ``CRITIQUE: <what to change>`` (which may continue over the following lines). Parsing is lenient about
the form (case, markdown ``**``, ``#``, ``[ ]``, separators ``: . ) -``, ``VERDICT`` / ``CRITERION`` instead of
``ITEM``) and strict about the meaning: an item with no verdict line is ``MISSING`` and counts as a failure, a line
naming an item that does not exist is ignored, and if an item gets several verdicts the last one wins. So a reply
that cannot be read never passes.
"""
from __future__ import annotations

import dataclasses
import re

PASS, FAIL, MISSING = "PASS", "FAIL", "MISSING"
_EMPHASIS = re.compile(r"[*_`#>\[\]]+")
_LEADING_EMPHASIS = re.compile(r"^\s*(?:\*\*|__)")
_CHECK_ITEM = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•](?=\s))\s*(.+?)\s*$")
_VERDICT = re.compile(r"^\s*(?:[-•]\s*)?(?:item|verdict|criterion|check)?\s*#?\s*(\d+)\s*[:.)\-–]\s*(pass|fail)\b\s*[-:–,.]*\s*(.*)$",
                      re.IGNORECASE)
_CRITIQUE = re.compile(r"^\s*critique\s*:\s*(.*)$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Verdict:
  item: str
  verdict: str        # PASS | FAIL | MISSING
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Evaluation:
  verdicts: tuple[Verdict, ...]
  critique: str

  @property
  def passed(self) -> bool:
    return bool(self.verdicts) and all(v.verdict == PASS for v in self.verdicts)

  def failures(self) -> list[Verdict]:
    return [v for v in self.verdicts if v.verdict != PASS]

  def to_dict(self) -> dict:
    return {"passed": self.passed, "critique": self.critique,
            "verdicts": [dataclasses.asdict(v) for v in self.verdicts]}


def _clean(line: str) -> str:
  return _EMPHASIS.sub("", line).strip()


def parse_checklist(text: str, max_items: int = 8) -> list[str]:
  items: list[str] = []
  for line in text.splitlines():
    match = _CHECK_ITEM.match(_LEADING_EMPHASIS.sub("", line))
    if not match:
      continue
    item = _clean(match.group(1)).strip(" :")
    if len(item) < 3 or item.lower() in (i.lower() for i in items):
      continue
    items.append(item)
    if len(items) == max_items:
      break
  return items


def parse_verdicts(text: str, checklist: list[str]) -> Evaluation:
  found: dict[int, tuple[str, str]] = {}
  critique_lines: list[str] = []
  in_critique = False
  for raw in text.splitlines():
    line = _clean(raw)
    match = _VERDICT.match(line)
    if match:
      in_critique = False
      number = int(match.group(1))
      if 1 <= number <= len(checklist):
        found[number] = (match.group(2).upper(), match.group(3).strip())
      continue
    critique = _CRITIQUE.match(line)
    if critique:
      in_critique = True
      critique_lines.append(critique.group(1).strip())
    elif in_critique and line:
      critique_lines.append(line)
  verdicts = tuple(Verdict(item, *found.get(i + 1, (MISSING, ""))) for i, item in enumerate(checklist))
  return Evaluation(verdicts, "\n".join(l for l in critique_lines if l))
