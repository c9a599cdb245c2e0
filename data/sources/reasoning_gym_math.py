"""Math tasks from reasoning_gym as chat records, with worked traces and scorers.

A record is
    {"id": "basic_arithmetic/L1/train/17", "task": ..., "level": 1,
     "question": ..., "answer": ...,
     "messages": [{"role": "user", "content": question},
                  {"role": "assistant", "content": "<think>trace</think><answer>answer</answer>"}],
     "entry": json.dumps(reasoning_gym entry)}
where the trace is a genuine step-by-step computation for the tasks we can
solve exactly (arithmetic expressions, GCD) and empty otherwise.

Difficulty levels (LEVEL_TASK_KWARGS) feed `data.mixture`'s curriculum:

    task              level 0 (default)      level 1               level 2
    basic_arithmetic  2-3 terms, 1-2 digits, 3-4 terms, 2 digits,  4-5 terms, 2 digits,
                      + - on numbers >= 0    + - with negatives,   + - * / with negatives
                                             brackets, -( )        and brackets
    chain_sum         2-3 terms, 1-2 digits  3-4 terms, 2 digits   4-5 terms, 2 digits
    gcd               2 numbers <= 99        2 numbers <= 999      2-3 numbers <= 9999
    leg_counting      1-2 animals, <= 3 each 2-3 animals, <= 5     3-5 animals, <= 10

Level 0 is sized for a ~1M-parameter model. It is not smaller because train
must still find questions outside a 2000-item eval guard: two one-digit terms
give only 200 distinct chain sums. reasoning_gym's own curricula
(`BasicArithmeticCurriculum`, ...) step every attribute together and start at
gcd values up to 100, so the levels here are spelled out instead.

Arithmetic traces work + and - digit by digit, the way a small transformer can
copy them token by token (sentencepiece splits digits, so every digit is one
token): signs are settled first, then columns right to left with explicit
carries and borrows, e.g. for "83 - 49 - 43"

    83 - 49: 13-9=4, 8-4-1=3 = 34
    34 - 43 = -(43 - 34): 13-4=9, 4-3-1=0 = -9

In configs/math_probe.py (the default teacher, 500 steps, math at 50%) held-out
level-0 accuracy is 0.68 on basic_arithmetic and 0.76 on chain_sum with these
traces. With one line "a op b = c" per operation chain_sum (same questions)
was at 0.08, and basic_arithmetic's former level 0 (with * and brackets) at
0.06: the model learnt the format but not the sums.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence

import reasoning_gym

SPLITS = ("train", "eval")
DEFAULT_TASKS = ("basic_arithmetic", "chain_sum", "gcd")
LEVELS = (0, 1, 2)
_TERMS_AND_DIGITS = (
    # Small problems at level 0: a ~1M-parameter model must be able to learn these.
    dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
    dict(min_terms=3, max_terms=4, min_digits=2, max_digits=2),
    # Two digits, not three: five 3-digit terms worked digit by digit overflow a
    # 256-token sequence.
    dict(min_terms=4, max_terms=5, min_digits=2, max_digits=2),
)
# basic_arithmetic adds operators and bracketing level by level: level 0 is
# sums and differences of non-negative numbers (reasoning_gym's "simple" task),
# level 1 brings negative numbers, brackets and negated brackets, level 2 * and /.
_BASIC_ARITHMETIC_OPERATORS = (
    dict(operators=("+", "-"), allow_parentheses=False),
    dict(operators=("+", "-")),
    dict(operators=("+", "-", "*", "/")),
)
# reasoning_gym config kwargs per task, one dict per level in LEVELS.
LEVEL_TASK_KWARGS = {
    "basic_arithmetic": tuple({**terms, **ops} for terms, ops
                              in zip(_TERMS_AND_DIGITS, _BASIC_ARITHMETIC_OPERATORS)),
    "chain_sum": _TERMS_AND_DIGITS,
    "gcd": (
        dict(min_numbers=2, max_numbers=2, min_value=1, max_value=99),
        dict(min_numbers=2, max_numbers=2, min_value=1, max_value=999),
        dict(min_numbers=2, max_numbers=3, min_value=1, max_value=9999),
    ),
    "leg_counting": (
        dict(min_animals=1, max_animals=2, max_instances=3),
        dict(min_animals=2, max_animals=3, max_instances=5),
        dict(min_animals=3, max_animals=5, max_instances=10),
    ),
}
# By default train drops questions from an eval split this large, which covers
# any eval set we build, so train does not leak whatever size eval asks for.
EVAL_GUARD_SIZE = 2000
# Tiny task configs have few distinct questions; stop rather than loop forever.
_MAX_DRAWS_PER_ITEM = 20


# ----------------------------------------------------------------- traces ---

_TOKEN_RE = re.compile(r"\s*(\d+|[-+*/()])")


def _tokenize(expression: str) -> list[str]:
  tokens, pos = [], 0
  expression = expression.rstrip()
  while pos < len(expression):
    match = _TOKEN_RE.match(expression, pos)
    if match is None:
      raise ValueError(f"Cannot tokenize {expression!r} at position {pos}.")
    tokens.append(match.group(1))
    pos = match.end()
  return tokens


class _Parser:
  """Recursive descent with Python's precedence: unary minus > * / > + -."""

  def __init__(self, tokens: list[str]):
    self.tokens, self.pos = tokens, 0

  def parse(self):
    node = self.expr()
    if self.pos != len(self.tokens):
      raise ValueError(f"Unexpected token {self.tokens[self.pos]!r}.")
    return node

  def peek(self):
    return self.tokens[self.pos] if self.pos < len(self.tokens) else None

  def take(self):
    self.pos += 1
    return self.tokens[self.pos - 1]

  def expr(self):
    node = self.term()
    while self.peek() in ("+", "-"):
      node = ("bin", self.take(), node, self.term())
    return node

  def term(self):
    node = self.unary()
    while self.peek() in ("*", "/"):
      node = ("bin", self.take(), node, self.unary())
    return node

  def unary(self):
    if self.peek() == "-":
      self.take()
      operand = self.unary()
      # "-7" is a literal, not a step worth writing down.
      return ("num", -operand[1]) if operand[0] == "num" else ("neg", operand)
    if self.peek() == "(":
      self.take()
      node = self.expr()
      if self.take() != ")":
        raise ValueError("Unbalanced parentheses.")
      return node
    token = self.take() if self.peek() is not None else None
    if token is None or not token.isdigit():
      raise ValueError(f"Expected a number, got {token!r}.")
    return ("num", int(token))


def _columns_add(x: int, y: int) -> tuple[str, int]:
  """Column addition of x, y >= 0, right to left: "7+5=12, 4+8+1=13" for 47 + 85.

  Each column adds the two digits (0 where a number has run out) and the carry
  ("+1", written only when there is one); the sum's last digit stays in the
  column and its tens digit is the next column's carry.
  """
  xs, ys = str(x)[::-1], str(y)[::-1]
  width = max(len(xs), len(ys))
  columns, digits, carry = [], [], 0
  for i in range(width):
    a, b = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
    total = a + b + carry
    columns.append(f"{a}+{b}" + ("+1" if carry else "") + f"={total}")
    # The last column keeps its carry: its whole sum leads the result.
    digits.append(str(total) if i == width - 1 else str(total % 10))
    carry = total // 10
  return ", ".join(columns), int("".join(reversed(digits)))


def _columns_sub(x: int, y: int) -> tuple[str, int]:
  """Column subtraction of x >= y >= 0: "13-9=4, 8-4-1=3" for 83 - 49.

  A column that must borrow writes its top digit plus ten ("13"); the next
  column pays the borrow back ("-1").
  """
  if not 0 <= y <= x:
    raise ValueError(f"Column subtraction needs x >= y >= 0, got {x} - {y}.")
  xs, ys = str(x)[::-1], str(y)[::-1]
  columns, digits, borrow = [], [], 0
  for i in range(len(xs)):
    a, b = int(xs[i]), int(ys[i]) if i < len(ys) else 0
    top = a + 10 if a - b - borrow < 0 else a
    columns.append(f"{top}-{b}" + ("-1" if borrow else "") + f"={top - b - borrow}")
    digits.append(str(top - b - borrow))
    borrow = int(top > a)
  return ", ".join(columns), int("".join(reversed(digits)))


def _add_sub_step(a: int, op: str, b: int) -> tuple[str, int]:
  """One + or - of signed numbers, worked digit by digit.

  The signs are settled first, by rewriting the operation as a sum or a
  (larger minus smaller) difference of magnitudes, negated when the result is
  negative; the rewrite is written only when it differs from the operation:
      "83 - 49: 13-9=4, 8-4-1=3 = 34"
      "34 - 43 = -(43 - 34): 13-4=9, 4-3-1=0 = -9"
      "-23 - -76 = 76 - 23: 6-3=3, 7-2=5 = 53"
  """
  y = b if op == "+" else -b
  value = a + y
  if (a >= 0) == (y >= 0):  # same signs: add the magnitudes
    x_mag, y_mag, sub, negative = abs(a), abs(y), False, a < 0
  else:  # opposite signs: subtract the smaller magnitude from the larger
    x_mag, y_mag = max(abs(a), abs(y)), min(abs(a), abs(y))
    sub, negative = True, value < 0
  rewrite = f"{x_mag} {'-' if sub else '+'} {y_mag}"
  rewrite = f"-({rewrite})" if negative else rewrite
  header = f"{a} {op} {b}"
  if rewrite != header:
    header += f" = {rewrite}"
  columns, magnitude = (_columns_sub if sub else _columns_add)(x_mag, y_mag)
  if (-magnitude if negative else magnitude) != value:  # a bug here, never in the data
    raise AssertionError(f"Column trace of {a} {op} {b} gives {magnitude}, not {value}.")
  return f"{header}: {columns} = {value}", value


def _evaluate(node, steps: list[str]) -> int:
  """Evaluates innermost-first, left to right, writing one line per operation.

  + and - are worked digit by digit (_add_sub_step); * and / take one line.
  """
  if node[0] == "num":
    return node[1]
  if node[0] == "neg":
    value = _evaluate(node[1], steps)
    steps.append(f"-({value}) = {-value}")
    return -value
  _, op, left, right = node
  a, b = _evaluate(left, steps), _evaluate(right, steps)
  if op in "+-":
    line, value = _add_sub_step(a, op, b)
    steps.append(line)
    return value
  # reasoning_gym evaluates "/" as floor division (eval with "//").
  value = {"*": a * b, "/": a // b if b else None}[op]
  if value is None:
    raise ZeroDivisionError(f"{a} / {b}")
  steps.append(f"{a} {op} {b} = {value}")
  return value


def arithmetic_trace(expression: str) -> tuple[str, int]:
  """One line per operation; + and - digit by digit, e.g. for "5 - 3 - 6"
  "5 - 3: 5-3=2 = 2\n2 - 6 = -(6 - 2): 6-2=4 = -4".

  Returns:
    (trace, value): the trace text and the value it arrives at.
  """
  steps: list[str] = []
  value = _evaluate(_Parser(_tokenize(expression)).parse(), steps)
  return "\n".join(steps), value


def gcd_trace(numbers: Sequence[int]) -> tuple[str, int]:
  """Euclid's algorithm, one remainder per line, folded over the numbers."""
  steps, result = [], numbers[0]
  for n in numbers[1:]:
    a, b = max(result, n), min(result, n)
    while b:
      steps.append(f"{a} mod {b} = {a % b}")
      a, b = b, a % b
    result = a
  return "\n".join(steps), result


def _trace(task: str, entry: dict) -> str:
  """A verified trace for `entry`, or "" when we cannot produce a correct one."""
  try:
    if task in ("basic_arithmetic", "chain_sum"):
      trace, value = arithmetic_trace(entry["metadata"]["expression"])
    elif task == "gcd":
      trace, value = gcd_trace(entry["metadata"]["numbers"])
    else:
      return ""
  except (ValueError, ZeroDivisionError, KeyError):
    return ""
  # A trace that disagrees with the reference would teach wrong arithmetic.
  return trace if str(value) == entry["answer"].strip() else ""


# ---------------------------------------------------------------- records ---


def _split_seed(seed: int, split: str, task: str, level: int = 0) -> int:
  # Hashing spreads seeds apart: reasoning_gym item i uses Random(seed + i), so
  # nearby seeds would generate overlapping items. Level 0 keeps the seed it had
  # before levels existed, so its records did not change.
  key = f"{seed}/{split}/{task}" + (f"/L{level}" if level else "")
  digest = hashlib.sha256(key.encode()).digest()
  return int.from_bytes(digest[:4], "little") >> 1


def _level_kwargs(task: str, level: int) -> dict:
  levels = LEVEL_TASK_KWARGS.get(task)
  if levels is None:
    if level:
      raise ValueError(
          f"Task {task!r} has no difficulty levels; only level 0 (reasoning_gym's"
          f" defaults). Tasks with levels: {sorted(LEVEL_TASK_KWARGS)}.")
    return {}
  return dict(levels[level])


def _records(
    task: str, split: str, size: int, seed: int, kwargs: dict,
    exclude: Collection[str] = (), *, level: int = 0,
) -> list[dict]:
  """The first `size` items of the split whose question is not in `exclude`."""
  dataset = reasoning_gym.create_dataset(
      task, size=max(size, 1), seed=_split_seed(seed, split, task, level), **kwargs
  )
  records = []
  for index in range(size * _MAX_DRAWS_PER_ITEM):
    if len(records) == size:
      return records
    entry = dataset[index]
    question, answer = entry["question"], str(entry["answer"])
    if question in exclude:
      continue
    completion = f"<think>{_trace(task, entry)}</think><answer>{answer}</answer>"
    records.append({
        "id": f"{task}/L{level}/{split}/{index}",
        "task": task,
        "level": level,
        "question": question,
        "answer": answer,
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": completion},
        ],
        "entry": json.dumps(entry),
    })
  raise ValueError(
      f"Task {task!r} level {level} with {kwargs} has too few distinct questions outside the"
      f" eval split to make {size} {split} records; make the task harder or"
      " ask for fewer."
  )


def make_records(
    task_names: Sequence[str] = DEFAULT_TASKS,
    split: str = "train",
    size_per_task: int = 1000,
    seed: int = 0,
    task_kwargs: Mapping[str, dict] | None = None,
    *,
    levels: Sequence[int] = (0,),
    eval_guard_size: int = EVAL_GUARD_SIZE,
) -> list[dict]:
  """Generates records for one split; train never contains an eval question.

  Args:
    task_names: reasoning_gym dataset names.
    split: 'train' or 'eval'; each gets its own seed derived from `seed`.
    size_per_task: records per task, spread evenly over `levels` (the first
      levels get one more when it does not divide).
    seed: base seed; each split, task and level draws from its own seed.
    task_kwargs: per-task config kwargs, merged over the level's kwargs
      (LEVEL_TASK_KWARGS) at every level.
    levels: difficulty levels to generate, from LEVELS; tasks without a level
      table (not in LEVEL_TASK_KWARGS) have only level 0.
    eval_guard_size: train drops every question among the first this many
      eval items of each task at each of `levels`; it must be at least the
      eval size you use. Make train and eval with the same `levels`: a
      question can belong to two levels' spaces.

  Returns:
    Records, task by task and level by level, in generation order.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  levels = list(levels)
  valid = [isinstance(level, int) and not isinstance(level, bool) and level in LEVELS
           for level in levels]
  if not levels or not all(valid) or len(set(levels)) != len(levels):
    raise ValueError(f"levels must be distinct ints from {LEVELS}, got {levels}.")
  task_kwargs = dict(task_kwargs or {})
  unknown = set(task_kwargs) - set(task_names)
  if unknown:
    raise ValueError(f"task_kwargs names tasks not in task_names: {sorted(unknown)}.")
  records = []
  for task in task_names:
    kwargs = {level: {**_level_kwargs(task, level), **task_kwargs.get(task, {})}
              for level in levels}
    exclude = set()
    if split == "train":
      # Eval first, so that train can drop whatever eval may contain, at any of
      # the levels: level spaces overlap (a 3-term, 2-digit sum is level 0 and 1).
      for level in levels:
        guard = _records(task, "eval", eval_guard_size, seed, kwargs[level], level=level)
        exclude |= {r["question"] for r in guard}
    for i, level in enumerate(levels):
      size = size_per_task // len(levels) + (i < size_per_task % len(levels))
      records += _records(task, split, size, seed, kwargs[level], exclude, level=level)
  return records


def check_disjoint(train: Sequence[dict], eval_: Sequence[dict]) -> None:
  """Raises ValueError if any eval question also appears in train."""
  train_questions = {r["question"] for r in train}
  leaked = [r["id"] for r in eval_ if r["question"] in train_questions]
  if leaked:
    raise ValueError(f"{len(leaked)} eval questions appear in train, e.g. {leaked[:5]}.")


# ---------------------------------------------------------------- scoring ---


def extract_answer(completion: str) -> str | None:
  """The stripped content of the last complete `<answer>...</answer>`, or None."""
  end = completion.rfind("</answer>")
  if end < 0:
    return None
  start = completion.rfind("<answer>", 0, end)
  if start < 0:
    return None
  answer = completion[start + len("<answer>"):end].strip()
  return answer or None


@functools.lru_cache(maxsize=None)
def _score_fn(task: str):
  return reasoning_gym.get_score_answer_fn(task)


def score(record: dict, completion: str, *, partial_credit: bool = False) -> float:
  """Scores a completion with the task's own reasoning_gym scorer.

  Args:
    record: a record from `make_records`.
    completion: the generated assistant text.
    partial_credit: keep reasoning_gym's partial scores. Off by default because
      its default scorer pays len(oracle)/len(answer) whenever the answer
      merely contains the oracle (oracle "2", answer "12" scores 0.5), which a
      policy can exploit; off, anything short of full marks scores 0.

  Returns:
    A reward in [0, 1]; 0.0 when there is no answer.
  """
  answer = extract_answer(completion)
  if answer is None:
    return 0.0
  value = float(_score_fn(record["task"])(answer, json.loads(record["entry"])))
  return value if partial_credit else float(value >= 1.0)


# ------------------------------------------------------- checking traces ---

# `a op b op c = r` with integer operands and + - * mod: the claims a worked
# trace makes ("9+2+1=12", "228 * -66 = -15048", "1597 mod 1038 = 559"). A
# result may not go on as an expression ("-45 - -69 = 69 - 45" rewrites, it
# does not claim 69), nor an operand continue one to its left ("-(15048 - 28)"
# is not read as "15048 - 28"), and a claim stays on one line.
_CLAIM_RE = re.compile(
    r"(?<![\d)])(?<!mod )(-?\d+(?:[ \t]*(?:[-+*]|mod)[ \t]*-?\d+)+)[ \t]*=[ \t]*(-?\d+)"
    r"(?![ \t]*(?:[-+*/(\d]|mod\b))(?!\.\d)")
_MAX_CLAIM_DIGITS = 60


def _evaluate_claim(expression: str) -> int | None:
  """The value of `a op b op ...` (+ - * mod; * and mod before + -), or None."""
  terms, sign, negate = [], 1, False
  product, pending = None, None  # the running product term, its pending * or mod
  for tok in re.findall(r"mod|[-+*]|\d+", expression):
    if tok.isdigit():
      value = -int(tok) if negate else int(tok)
      negate = False
      if product is None:
        product = value
      elif pending == "*":
        product *= value
      elif value == 0:  # mod 0
        return None
      else:
        product %= value
      pending = None
    elif product is None or pending is not None:  # a sign, not an operator
      if tok != "-":
        return None
      negate = not negate
    elif tok in ("*", "mod"):
      pending = tok
    else:
      terms.append(sign * product)
      sign, product = (1 if tok == "+" else -1), None
  if product is None or pending is not None:
    return None
  return sum(terms) + sign * product


def arithmetic_claims(text: str) -> list[tuple[str, bool]]:
  """Every integer claim `expression = result` in `text`, with whether it is
  true. Claims with very long numbers are skipped."""
  out = []
  for match in _CLAIM_RE.finditer(text):
    if len(re.sub(r"\D", "", match.group(0))) > _MAX_CLAIM_DIGITS:
      continue
    value = _evaluate_claim(match.group(1))
    if value is not None:
      out.append((match.group(0), value == int(match.group(2))))
  return out


def reasoning(completion: str) -> str:
  """The part of a completion before its first `</think>` (all of it if none)."""
  return completion.split("</think>", 1)[0]


def claims_hold(completion: str) -> bool | None:
  """Whether every arithmetic claim of the completion's reasoning is true;
  None when the reasoning makes no claim."""
  claims = arithmetic_claims(reasoning(completion))
  return all(ok for _, ok in claims) if claims else None


def sound(record: dict, completion: str) -> bool:
  """Right by `score`, and reached through reasoning that makes at least one
  arithmetic claim and no false one. A small model often writes a right answer
  (1 or 2 is the gcd of 60% of the items) after a trace that computes
  something else; `score` cannot tell that from a worked answer."""
  return score(record, completion) >= 1.0 and claims_hold(completion) is True
