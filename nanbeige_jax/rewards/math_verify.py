"""Answer checking with Hugging Face ``math-verify`` (symbolic/numeric equivalence, not a string compare).

``check_answer(completion, gold)`` extracts the model's final answer (the text after the last ``The answer is``,
else the last ``\\boxed{...}``), parses it and the gold answer with ``math_verify.parse`` and compares them with
``math_verify.verify``. A completion with neither is wrong (``no_answer``): letting math-verify pick any number out
of free text would reward rambling that happens to contain the answer; ``require_answer_span=False`` allows it. Every check runs under a
per-sample wall-clock timeout: in the main thread a ``SIGALRM`` timer around parse + verify (math-verify's own
signal timers are disabled so they do not clobber ours); in any other thread, in a child process that is killed
when time is up. A timed-out or unparsable sample counts as wrong and says so in its ``AnswerCheck``.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import re
import signal
import threading

ANSWER_PATTERN = re.compile(r"[Tt]he (?:final )?answer is[:\s]*(.+?)\s*(?:\.\s*)?(?:\n|$)")
BOXED = "\\boxed{"
# math-verify warns on every call that its own timers are off; ours are on (see the module docstring).
logging.getLogger("math_verify").setLevel(logging.ERROR)


@dataclasses.dataclass(frozen=True)
class AnswerCheck:
  correct: bool
  extracted: str | None     # the answer text taken from the completion (None: nothing found)
  status: str               # "ok" | "no_answer" | "timeout" | "error: ..."


class _Timeout(Exception):
  pass


def extract_answer_text(completion: str) -> str | None:
  """The final answer span of a completion: after the last "The answer is", else the last \\boxed{...}."""
  matches = ANSWER_PATTERN.findall(completion)
  if matches:
    return matches[-1].strip()
  start = completion.rfind(BOXED)
  if start >= 0:
    depth, i = 1, start + len(BOXED)
    while i < len(completion) and depth:
      depth += {"{": 1, "}": -1}.get(completion[i], 0)
      i += 1
    if depth == 0:
      return completion[start:i]
  return None


def _check(completion: str, gold: str, require_answer_span: bool = True) -> AnswerCheck:
  from math_verify import parse, verify
  extracted = extract_answer_text(completion)
  if extracted is None and require_answer_span:
    return AnswerCheck(False, None, "no_answer")
  target = completion if extracted is None else (extracted if extracted.startswith(BOXED) else f"${extracted}$")
  predicted = parse(target, parsing_timeout=None)
  if not predicted:
    return AnswerCheck(False, extracted, "no_answer")
  gold_parsed = parse(f"${gold}$", parsing_timeout=None)
  if not gold_parsed:
    raise ValueError(f"gold answer {gold!r} cannot be parsed by math-verify")
  return AnswerCheck(bool(verify(gold_parsed, predicted, timeout_seconds=None)), extracted, "ok")


def _alarm(signum, frame):
  raise _Timeout()


def _child(conn, completion: str, gold: str, require_answer_span: bool) -> None:
  try:
    conn.send(_check(completion, gold, require_answer_span))
  except Exception as e:  # reported to the parent, which decides
    conn.send(e)
  finally:
    conn.close()


def check_answer(completion: str, gold: str | int | float, timeout_s: float = 5.0, *,
                 require_answer_span: bool = True) -> AnswerCheck:
  """Is ``completion``'s final answer mathematically equal to ``gold``? Never raises for a bad completion; a
  gold answer math-verify cannot parse is a ValueError (a broken task, not a wrong model)."""
  if not isinstance(completion, str):
    raise TypeError(f"check_answer: completion must be a str, found {type(completion).__name__}")
  if not timeout_s > 0:
    raise ValueError(f"check_answer: timeout_s must be > 0, found {timeout_s!r}")
  gold = str(gold)
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
      return _check(completion, gold, require_answer_span)
    except _Timeout:
      return AnswerCheck(False, extract_answer_text(completion), "timeout")
    except ValueError:
      raise
    except Exception as e:  # sympy/latex2sympy failures on odd model output
      return AnswerCheck(False, extract_answer_text(completion), f"error: {type(e).__name__}: {e}")
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)
      signal.signal(signal.SIGALRM, previous)
  # fork: the child only runs math-verify (no JAX), and needs no importable __main__.
  context = multiprocessing.get_context("fork")
  parent, child = context.Pipe(duplex=False)
  proc = context.Process(target=_child, args=(child, completion, gold, require_answer_span),
                         daemon=True)
  proc.start()
  child.close()
  try:
    if not parent.poll(timeout_s):
      return AnswerCheck(False, extract_answer_text(completion), "timeout")
    try:
      result = parent.recv()
    except EOFError:
      result = RuntimeError(f"checker process exited with code {proc.exitcode} without a result")
  finally:
    proc.kill()
    proc.join()
  if isinstance(result, ValueError):
    raise result
  if isinstance(result, Exception):
    return AnswerCheck(False, extract_answer_text(completion), f"error: {type(result).__name__}: {result}")
  return result
