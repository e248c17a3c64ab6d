"""Procedurally generated GSM8K-style arithmetic word problems with worked, step-by-step solutions.

Every problem comes from one of a few templates (shopping totals, rates, equal sharing, running stock, savings,
change from a payment); each ``difficulty`` level (1-3) adds at least one arithmetic step to a template. Level 0 is
a warm-up level for very small models: every template as a single step on single-digit operands (at most 30 for the
library's stock), so the skill is reading the numbers off the question and one arithmetic fact. All answers are
integers and every intermediate result is a non-negative integer. Solutions end with the line
``The answer is N.`` so that a verifier can parse them.

Splits are disjoint by construction: a problem belongs to ``heldout`` iff a stable hash of its canonical form
(template + numbers + names) falls in the held-out bucket, else to ``train``; both splits are generated from the same
deterministic stream and filtered, and duplicates within a split are dropped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable

SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 10  # 1 in 10 canonical problems is held out
NAMES = ("Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Chen", "Sofia", "Ben", "Ines")
ITEMS = (("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("ticket", "tickets"), ("mug", "mugs"),
         ("book", "books"), ("candle", "candles"), ("toy car", "toy cars"))
ANSWER_PREFIX = "The answer is "
DIFFICULTIES = (0, 1, 2, 3)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One word problem. ``numbers`` are the problem's inputs in template order (for independent re-checking)."""

  question: str
  solution: str
  answer: int
  id: str
  template: str
  numbers: tuple[int, ...]
  difficulty: int


def _canonical_id(template: str, numbers: tuple[int, ...], words: tuple[str, ...]) -> str:
  canonical = f"{template}|{','.join(map(str, numbers))}|{','.join(words)}"
  return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _split_of(problem_id: str) -> str:
  return "heldout" if int(problem_id, 16) % HELDOUT_BUCKETS == 0 else "train"


def _finish(template: str, numbers: tuple[int, ...], words: tuple[str, ...], question: str, steps: list[str],
            answer: int, difficulty: int) -> Problem:
  solution = "\n".join(steps + [f"{ANSWER_PREFIX}{answer}."])
  return Problem(question=question, solution=solution, answer=answer, id=_canonical_id(template, numbers, words),
                 template=template, numbers=numbers, difficulty=difficulty)


def _shopping(rng: random.Random, difficulty: int) -> Problem:
  """Sum of (count x unit price) over ``difficulty`` item kinds."""
  name = rng.choice(NAMES)
  kinds = rng.sample(ITEMS, max(difficulty, 1))
  numbers: list[int] = []
  parts, steps, costs = [], [], []
  for singular, plural in kinds:
    if difficulty == 0:
      count, price = rng.randint(2, 5), rng.randint(1, 9)
    else:
      count, price = rng.randint(2, 9), rng.randint(1, 15)
    numbers += [count, price]
    parts.append(f"{count} {plural} at ${price} each")
    costs.append(count * price)
    steps.append(f"The {plural} cost {count} × {price} = {count * price} dollars.")
  total = sum(costs)
  if len(costs) > 1:
    running = costs[0]
    for cost in costs[1:]:
      steps.append(f"Running total: {running} + {cost} = {running + cost} dollars.")
      running += cost
  listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  question = f"{name} buys {listing}. How many dollars does {name} spend in total?"
  return _finish("shopping", tuple(numbers), (name,) + tuple(k[0] for k in kinds), question, steps, total,
                 difficulty)


def _rate(rng: random.Random, difficulty: int) -> Problem:
  """rate x hours, then (difficulty >= 2) minus rejects, then (difficulty >= 3) split into boxes."""
  rate, hours = (rng.randint(2, 9), rng.randint(2, 5)) if difficulty == 0 else (rng.randint(3, 40), rng.randint(2, 12))
  made = rate * hours
  steps = [f"In {hours} hours the machine makes {rate} × {hours} = {made} widgets."]
  question = f"A machine makes {rate} widgets per hour. It runs for {hours} hours."
  numbers = [rate, hours]
  answer = made
  if difficulty >= 2:
    rejected = rng.randint(1, made - 1)
    numbers.append(rejected)
    answer = made - rejected
    question += f" Then {rejected} widgets are rejected."
    steps.append(f"After removing the rejects: {made} - {rejected} = {answer} widgets.")
  if difficulty >= 3:
    box = rng.choice([d for d in range(2, 13) if answer % d == 0] or [1])
    numbers.append(box)
    question += f" The good widgets are packed {box} to a box."
    steps.append(f"Number of boxes: {answer} ÷ {box} = {answer // box}.")
    answer //= box
    question += " How many boxes are filled?"
  else:
    question += " How many good widgets are there?" if difficulty >= 2 else " How many widgets does it make?"
  return _finish("rate", tuple(numbers), (), question, steps, answer, difficulty)


def _sharing(rng: random.Random, difficulty: int) -> Problem:
  """Equal sharing: (packs x per_pack [+ extra]) ÷ people."""
  name = rng.choice(NAMES)
  if difficulty == 0:
    people, share = rng.randint(2, 5), rng.randint(2, 9)
  else:
    people, share = rng.randint(2, 9), rng.randint(2, 15)
  total = people * share
  if difficulty <= 1:
    question = (f"{name} has {total} cookies and shares them equally among {people} friends. "
                f"How many cookies does each friend get?")
    steps = [f"Each friend gets {total} ÷ {people} = {share} cookies."]
    return _finish("sharing", (total, people), (name,), question, steps, share, difficulty)
  per_pack = rng.choice([d for d in range(2, 13) if total % d == 0 and d < total] or [1])
  packs = total // per_pack
  question = (f"{name} buys {packs} packs of cookies with {per_pack} cookies in each pack and shares them equally "
              f"among {people} friends.")
  steps = [f"Total cookies: {packs} × {per_pack} = {total}.",
           f"Each friend gets {total} ÷ {people} = {share} cookies."]
  numbers = [packs, per_pack, people]
  answer = share
  if difficulty >= 3:
    eaten = rng.randint(1, share - 1) if share > 1 else 0
    numbers.append(eaten)
    answer = share - eaten
    question += f" Each friend eats {eaten} cookies right away. How many cookies does each friend have left?"
    steps.append(f"Left per friend: {share} - {eaten} = {answer} cookies.")
  else:
    question += " How many cookies does each friend get?"
  return _finish("sharing", tuple(numbers), (name,), question, steps, answer, difficulty)


def _stock(rng: random.Random, difficulty: int) -> Problem:
  """Running stock: start, then 1 + difficulty alternating lend/receive events."""
  stock = rng.randint(10, 30) if difficulty == 0 else rng.randint(50, 300)
  question = f"A library has {stock} books."
  steps = []
  numbers = [stock]
  for step in range(max(1, 1 + difficulty)):
    if step % 2 == 0:
      lent = rng.randint(1, 9) if difficulty == 0 else rng.randint(1, stock - 1)
      numbers.append(lent)
      question += f" It lends out {lent} books."
      steps.append(f"After lending: {stock} - {lent} = {stock - lent} books.")
      stock -= lent
    else:
      received = rng.randint(5, 80)
      numbers.append(received)
      question += f" It then receives {received} new books."
      steps.append(f"After receiving: {stock} + {received} = {stock + received} books.")
      stock += received
  question += " How many books does the library have now?"
  return _finish("stock", tuple(numbers), (), question, steps, stock, difficulty)


def _savings(rng: random.Random, difficulty: int) -> Problem:
  """weekly x weeks, (d >= 2) plus a gift, (d >= 3) minus a purchase."""
  name = rng.choice(NAMES)
  if difficulty == 0:
    weekly, weeks = rng.randint(2, 9), rng.randint(2, 5)
  else:
    weekly, weeks = rng.randint(2, 30), rng.randint(2, 20)
  saved = weekly * weeks
  question = f"{name} saves ${weekly} every week for {weeks} weeks."
  steps = [f"Savings: {weekly} × {weeks} = {saved} dollars."]
  numbers = [weekly, weeks]
  if difficulty >= 2:
    gift = rng.randint(5, 100)
    numbers.append(gift)
    question += f" A grandparent adds a gift of ${gift}."
    steps.append(f"With the gift: {saved} + {gift} = {saved + gift} dollars.")
    saved += gift
  if difficulty >= 3:
    spent = rng.randint(1, saved - 1)
    numbers.append(spent)
    question += f" {name} then spends ${spent} on a bike."
    steps.append(f"After the bike: {saved} - {spent} = {saved - spent} dollars.")
    saved -= spent
  question += f" How many dollars does {name} have?"
  return _finish("savings", tuple(numbers), (name,), question, steps, saved, difficulty)


def _change(rng: random.Random, difficulty: int) -> Problem:
  """Change from a bill after buying count x price (+ a second item kind for d >= 2, a coupon for d >= 3); d = 0:
  one item at a single-digit price from a $10 bill."""
  name = rng.choice(NAMES)
  (singular, plural), (singular2, plural2) = rng.sample(ITEMS, 2)
  if difficulty == 0:
    price = rng.randint(1, 9)
    question = (f"{name} buys one {singular} for ${price} and pays with a $10 bill. "
                f"How many dollars of change does {name} get?")
    steps = [f"Change: 10 - {price} = {10 - price} dollars."]
    return _finish("change", (price, 10), (name, singular), question, steps, 10 - price, difficulty)
  count, price = rng.randint(2, 6), rng.randint(2, 9)
  cost = count * price
  steps = [f"The {plural} cost {count} × {price} = {cost} dollars."]
  numbers = [count, price]
  question = f"{name} buys {count} {plural} at ${price} each"
  if difficulty >= 2:
    count2, price2 = rng.randint(1, 5), rng.randint(2, 9)
    numbers += [count2, price2]
    question += f" and {count2} {plural2 if count2 > 1 else singular2} at ${price2} each"
    steps.append(f"The {plural2} cost {count2} × {price2} = {count2 * price2} dollars.")
    steps.append(f"Total cost: {cost} + {count2 * price2} = {cost + count2 * price2} dollars.")
    cost += count2 * price2
  if difficulty >= 3:
    coupon = rng.randint(1, cost - 1)
    numbers.append(coupon)
    question += f", using a coupon worth ${coupon}"
    steps.append(f"After the coupon: {cost} - {coupon} = {cost - coupon} dollars.")
    cost -= coupon
  bill = next(b for b in (10, 20, 50, 100, 200) if b > cost)
  numbers.append(bill)
  question += f". {name} pays with a ${bill} bill. How many dollars of change does {name} get?"
  steps.append(f"Change: {bill} - {cost} = {bill - cost} dollars.")
  words = (name, singular, singular2) if difficulty >= 2 else (name, singular)
  return _finish("change", tuple(numbers), words, question, steps, bill - cost, difficulty)


TEMPLATES: dict[str, Callable[[random.Random, int], Problem]] = {
    "shopping": _shopping, "rate": _rate, "sharing": _sharing, "stock": _stock, "savings": _savings,
    "change": _change,
}


def generate(split: str, num_problems: int, *, seed: int = 0, difficulties: tuple[int, ...] = (1, 2, 3)
             ) -> list[Problem]:
  """The first ``num_problems`` distinct problems of ``split`` from the deterministic stream for ``seed``."""
  if split not in SPLITS:
    raise ValueError(f"arithmetic split must be one of {SPLITS}, got {split!r}")
  if num_problems <= 0:
    raise ValueError(f"num_problems must be > 0, got {num_problems}")
  bad = [d for d in difficulties if d not in DIFFICULTIES]
  if not difficulties or bad:
    raise ValueError(f"difficulties must be a non-empty subset of {DIFFICULTIES}, got {difficulties}")
  rng = random.Random(f"nanbeige-arithmetic-{seed}")
  template_names = sorted(TEMPLATES)
  problems: list[Problem] = []
  seen: set[str] = set()
  attempts = 0
  max_attempts = 200 * num_problems * (HELDOUT_BUCKETS if split == "heldout" else 2)
  while len(problems) < num_problems:
    attempts += 1
    if attempts > max_attempts:
      raise ValueError(f"could only generate {len(problems)} distinct {split!r} arithmetic problems of the "
                       f"{num_problems} asked for difficulties {difficulties}")
    template = template_names[rng.randrange(len(template_names))]
    difficulty = difficulties[rng.randrange(len(difficulties))]
    problem = TEMPLATES[template](rng, difficulty)
    if _split_of(problem.id) != split or problem.id in seen:
      continue
    seen.add(problem.id)
    problems.append(problem)
  return problems


def render_for_pretraining(problem: Problem) -> str:
  """Problem and worked solution as one pre-training document."""
  return f"Question: {problem.question}\nAnswer: {problem.solution}"


def parse_answer(text: str) -> int | None:
  """The integer after the last ``The answer is`` in ``text`` (None when absent or not an integer)."""
  position = text.rfind(ANSWER_PREFIX)
  if position < 0:
    return None
  tail = text[position + len(ANSWER_PREFIX):].strip().rstrip(".").replace(",", "").strip()
  try:
    return int(tail.split()[0]) if tail else None
  except ValueError:
    return None
