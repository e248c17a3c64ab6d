"""Arithmetic word problems: deterministic disjoint splits, answers recomputed independently, parseable format."""
import collections
import re

import pytest

from nanbeige_jax.data.tasks import arithmetic


@pytest.fixture(scope="module")
def train():
  return arithmetic.generate("train", 3000)


@pytest.fixture(scope="module")
def heldout():
  return arithmetic.generate("heldout", 400)


def _expected_answer(problem: arithmetic.Problem) -> int:
  """Recomputes the answer from the problem's numbers, independently of the generator's step code."""
  n = problem.numbers
  if problem.template == "shopping":
    return sum(count * price for count, price in zip(n[0::2], n[1::2]))
  if problem.template == "rate":
    made = n[0] * n[1]
    good = made - n[2] if len(n) >= 3 else made
    if len(n) == 4:
      assert good % n[3] == 0
      return good // n[3]
    return good
  if problem.template == "sharing":
    total = n[0] if len(n) == 2 else n[0] * n[1]
    people = n[1] if len(n) == 2 else n[2]
    assert total % people == 0
    return total // people - (n[3] if len(n) == 4 else 0)
  if problem.template == "stock":
    stock = n[0]
    for step, amount in enumerate(n[1:]):
      stock += -amount if step % 2 == 0 else amount
    return stock
  if problem.template == "savings":
    return n[0] * n[1] + (n[2] if len(n) >= 3 else 0) - (n[3] if len(n) == 4 else 0)
  if problem.template == "change":
    if problem.difficulty == 0:  # one item at n[0] dollars from an n[1]-dollar bill
      return n[1] - n[0]
    bill = n[-1]
    cost = n[0] * n[1] + (n[2] * n[3] if len(n) >= 5 else 0) - (n[4] if len(n) == 6 else 0)
    return bill - cost
  raise AssertionError(f"unknown template {problem.template}")


def test_splits_are_deterministic(train):
  again = arithmetic.generate("train", 3000)
  assert [p.id for p in again] == [p.id for p in train]
  assert again[17] == train[17]
  assert [p.id for p in arithmetic.generate("train", 100, seed=1)] != [p.id for p in train[:100]]


def test_splits_are_disjoint(train, heldout):
  assert len({p.id for p in train}) == len(train)
  assert len({p.id for p in heldout}) == len(heldout)
  assert not {p.id for p in train} & {p.id for p in heldout}
  assert not {p.question for p in train} & {p.question for p in heldout}


def test_answers_are_correct(train, heldout):
  for problem in train + heldout:
    assert problem.answer == _expected_answer(problem), problem
    assert problem.answer >= 0
    for number in problem.numbers:
      assert str(number) in problem.question


def test_solution_steps_are_correct(train):
  operations = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b,
                "÷": lambda a, b: a / b}
  checked = 0
  for problem in train:
    for a, op, b, result in re.findall(r"(\d+) ([-+×÷]) (\d+) = (\d+)", problem.solution):
      assert operations[op](int(a), int(b)) == int(result), problem.solution
      checked += 1
    assert str(problem.answer) in problem.solution.splitlines()[-2]  # the last step computes the answer
  assert checked > len(train)


def test_answer_line_and_rendering(train):
  problem = train[0]
  assert problem.solution.splitlines()[-1] == f"The answer is {problem.answer}."
  assert arithmetic.parse_answer(problem.solution) == problem.answer
  rendered = arithmetic.render_for_pretraining(problem)
  assert rendered.startswith(f"Question: {problem.question}\nAnswer: ")
  assert rendered.endswith(f"The answer is {problem.answer}.")
  assert arithmetic.parse_answer("no answer here") is None
  assert arithmetic.parse_answer("The answer is 1,234.") == 1234


def test_difficulty_adds_steps(train):
  steps = collections.defaultdict(set)
  for problem in train:
    steps[(problem.template, problem.difficulty)].add(len(problem.solution.splitlines()) - 1)
  for template in arithmetic.TEMPLATES:
    counts = [steps[(template, d)] for d in (1, 2, 3)]
    assert all(counts), (template, counts)
    assert max(counts[0]) < min(counts[1]) and max(counts[1]) < min(counts[2]), (template, counts)


def test_difficulty_filter_and_bad_arguments():
  easy = arithmetic.generate("heldout", 50, difficulties=(1,))
  assert {p.difficulty for p in easy} == {1}
  with pytest.raises(ValueError, match="split"):
    arithmetic.generate("test", 10)
  with pytest.raises(ValueError, match="difficulties"):
    arithmetic.generate("train", 10, difficulties=(4,))
  with pytest.raises(ValueError, match="difficulties"):
    arithmetic.generate("train", 10, difficulties=())
  with pytest.raises(ValueError, match="num_problems"):
    arithmetic.generate("train", 0)


def test_warmup_level_is_one_small_step():
  """Level 0: every template, one worked step on small operands, answers right, splits disjoint; and adding the
  level left the stream of levels 1-3 untouched (the pre-training data)."""
  train, heldout = arithmetic.generate("train", 1500, difficulties=(0,)), arithmetic.generate("heldout", 64,
                                                                                              difficulties=(0,))
  assert {p.template for p in train} == set(arithmetic.TEMPLATES) == {p.template for p in heldout}
  assert not {p.id for p in train} & {p.id for p in heldout}
  assert not {p.question for p in train} & {p.question for p in heldout}
  for problem in train + heldout:
    assert problem.difficulty == 0 and problem.answer == _expected_answer(problem), problem
    steps = problem.solution.splitlines()[:-1]
    assert len(steps) == 1, problem.solution
    (a, op, b, result), = re.findall(r"(\d+) ([-+×÷]) (\d+) = (\d+)", steps[0])
    assert int(result) == problem.answer and min(int(a), int(b)) <= 9 and max(int(a), int(b)) <= 45, steps
    for number in problem.numbers:
      assert str(number) in problem.question
  mixed = arithmetic.generate("train", 200, difficulties=(0, 1, 2, 3))
  assert {p.difficulty for p in mixed} == {0, 1, 2, 3}
  # The default stream (levels 1-3, what pre-training reads) as it was before level 0 existed.
  assert [p.id for p in arithmetic.generate("train", 3)] == ["d1e169ea10c7e75b", "b4e7768732a28b71", "a70369cc9e7e4adc"]
  assert [p.id for p in arithmetic.generate("heldout", 2)] == ["3fb59ed51b599712", "52b46cb20e31fad6"]
