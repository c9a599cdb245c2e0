"""Small Python programming tasks with unit tests, generated procedurally.

A record is
    {"id": "code_gen/train/17", "task": "code_gen", "level": 1,
     "entry_point": "reverse", "prompt": "Write a Python function ...",
     "solution": "def reverse(s):\\n    return s[::-1]",
     "tests": ["assert reverse('ab') == 'ba'", ...],
     "messages": [{"role": "user", "content": prompt},
                  {"role": "assistant", "content":
                   "<think>plan</think><answer>\\n```python\\n...\\n```\\n</answer>"}]}

Levels: 0 = one-line arithmetic, 1 = one-line string/list operations,
2 = loops and conditions composed. Tests are computed by running the reference
solution on random inputs, so a solution always passes its own tests.

Train and eval are disjoint by construction: a task belongs to eval when the
hash of its prompt text falls in the eval bucket, so no prompt text can be in
both splits whatever their sizes (and each split also has its own seed).
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Callable, Sequence

SPLITS = ("train", "eval")
LEVELS = (0, 1, 2)
# One prompt text in this many goes to eval.
EVAL_BUCKETS = 8
TESTS_PER_TASK = 4
# Each draw is a template with random constants; draws from the other split (and
# repeats, when unique) are skipped, and a level that runs out of distinct
# prompts must stop rather than loop forever.
_MAX_DRAWS_PER_ITEM = 2000


# ------------------------------------------------------------- templates ---
# A template draws constants and returns (name, params, prompt text, plan,
# body lines, input generator); the body is indented under `def name(params):`.

_LETTERS = "abcdeilmnorst"


def _int(rng: random.Random) -> int:
  return rng.randint(-20, 20)


def _ints(rng: random.Random, min_len: int = 0) -> list[int]:
  return [_int(rng) for _ in range(rng.randint(min_len, 6))]


def _word(rng: random.Random, min_len: int = 0) -> str:
  return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(min_len, 7)))


def _mixed(rng: random.Random) -> str:
  pool = _LETTERS + "AEST019 "
  return "".join(rng.choice(pool) for _ in range(rng.randint(0, 8)))


def _sentence(rng: random.Random) -> str:
  return " ".join(_word(rng, 1) for _ in range(rng.randint(0, 4)))


def _signed(k: int) -> str:
  return f"+ {k}" if k >= 0 else f"- {-k}"


def _affine(rng):
  name, x = rng.choice("fgh"), rng.choice(["x", "n"])
  a, b = rng.randint(2, 9), rng.choice([i for i in range(-9, 10) if i])
  return (name, [x], f"returns {x} * {a} {_signed(b)}", f"Multiply {x} by {a}, then add {b}.",
          [f"return {x} * {a} {_signed(b)}"], lambda r: (_int(r),))


def _square_plus(rng):
  name, x, c = rng.choice("fgh"), rng.choice(["x", "n"]), rng.randint(-9, 9)
  return (name, [x], f"returns {x} squared {_signed(c)}", f"Square {x}, then add {c}.",
          [f"return {x} * {x} {_signed(c)}"], lambda r: (_int(r),))


def _two_arg_linear(rng):
  name, p, q = rng.choice("fgh"), rng.randint(1, 9), rng.randint(2, 9)
  op = rng.choice(["+", "-"])
  return (name, ["a", "b"], f"returns {p} * a {op} {q} * b",
          f"Compute {p} * a and {q} * b, then {'add' if op == '+' else 'subtract'} them.",
          [f"return {p} * a {op} {q} * b"], lambda r: (_int(r), _int(r)))


def _div_mod(rng):
  name, x, k = rng.choice("fgh"), rng.choice(["x", "n"]), rng.randint(2, 9)
  if rng.random() < 0.5:
    return (name, [x], f"returns the remainder of {x} divided by {k}",
            f"Use the % operator with {k}.", [f"return {x} % {k}"], lambda r: (_int(r),))
  return (name, [x], f"returns {x} divided by {k}, rounded down",
          f"Use floor division // by {k}.", [f"return {x} // {k}"], lambda r: (_int(r),))


def _diff_times(rng):
  name, k = rng.choice("fgh"), rng.randint(2, 9)
  return (name, ["a", "b"], f"returns (a - b) * {k}", f"Subtract b from a, then multiply by {k}.",
          [f"return (a - b) * {k}"], lambda r: (_int(r), _int(r)))


def _reverse(rng):
  name, s = rng.choice(["reverse", "backwards", "flip"]), rng.choice(["s", "text", "word"])
  case, call = rng.choice([("", ""), (" in upper case", ".upper()"), (" in lower case", ".lower()")])
  return (name, [s], f"returns the reverse of {s}{case}",
          f"Slice {s} with step -1{', then change the case' if call else ''}.",
          [f"return {s}[::-1]{call}"], lambda r: (_mixed(r),))


def _repeat(rng):
  name, s, k = rng.choice(["repeat", "copies"]), rng.choice(["s", "text", "word"]), rng.randint(2, 5)
  return (name, [s], f"returns {s} repeated {k} times", f"Multiply the string {s} by {k}.",
          [f"return {s} * {k}"], lambda r: (_word(r),))


def _count_char(rng):
  name, s, c = rng.choice(["count", "occurrences"]), rng.choice(["s", "text"]), rng.choice(_LETTERS)
  return (name, [s], f"returns how many times the letter '{c}' appears in {s}",
          f"Use the count method of {s}.", [f"return {s}.count('{c}')"], lambda r: (_word(r),))


def _list_agg(rng):
  xs = rng.choice(["xs", "nums", "values"])
  what, fn = rng.choice([("sum", "sum"), ("largest number", "max"), ("smallest number", "min"),
                         ("length", "len")])
  name = rng.choice([f"{fn}_of", f"list_{fn}", f"get_{fn}"])
  min_len = 1 if fn in ("max", "min") else 0
  return (name, [xs], f"returns the {what} of the list {xs}" +
          (f" ({xs} is never empty)" if min_len else ""), f"Use the built-in {fn}.",
          [f"return {fn}({xs})"], lambda r: (_ints(r, min_len),))


def _clamp(rng):
  name, x = rng.choice(["clamp", "limit", "bound"]), rng.choice(["x", "n"])
  lo, hi = rng.randint(-10, 0), rng.randint(1, 15)
  return (name, [x], f"returns {x} clamped to the range [{lo}, {hi}]",
          f"Take the max with {lo} of the min with {hi}.",
          [f"return max({lo}, min({x}, {hi}))"], lambda r: (_int(r),))


def _count_kind(rng):
  name, s = rng.choice(["count", "tally", "how_many"]), rng.choice(["s", "text", "word"])
  what, test = rng.choice([("vowels", "ch in 'aeiou'"), ("digits", "ch.isdigit()"),
                           ("upper case letters", "ch.isupper()"), ("spaces", "ch == ' '")])
  return (name, [s], f"returns the number of {what} in {s}",
          f"Count the characters ch of {s} with {test}.",
          [f"return sum(1 for ch in {s} if {test})"], lambda r: (_mixed(r),))


def _slice_end(rng):
  name, s, k = rng.choice(["head", "tail", "part"]), rng.choice(["s", "text"]), rng.randint(1, 5)
  first = rng.random() < 0.5
  return (name, [s], f"returns the {'first' if first else 'last'} {k} characters of {s}"
          f" (all of {s} if it is shorter)", f"Slice {s} with [{':' + str(k) if first else str(-k) + ':'}].",
          [f"return {s}[:{k}]" if first else f"return {s}[-{k}:]"], lambda r: (_word(r),))


def _is_multiple(rng):
  name, x, k = rng.choice(["divisible", "is_multiple", "check"]), rng.choice(["x", "n"]), rng.randint(2, 9)
  return (name, [x], f"returns True if {x} is divisible by {k}, else False",
          f"Compare {x} % {k} with 0.", [f"return {x} % {k} == 0"], lambda r: (_int(r),))


def _scale_list(rng):
  name, xs, k = rng.choice(["scale", "times", "multiply_all"]), rng.choice(["xs", "nums"]), rng.randint(2, 9)
  return (name, [xs], f"returns a list with each number of {xs} multiplied by {k}",
          f"Build a list comprehension over {xs}.", [f"return [x * {k} for x in {xs}]"],
          lambda r: (_ints(r),))


_CONDITIONS = [
    ("even", "x % 2 == 0"), ("odd", "x % 2 != 0"), ("negative", "x < 0"), ("positive", "x > 0"),
]


def _condition(rng) -> tuple[str, str]:
  if rng.random() < 0.5:
    return rng.choice(_CONDITIONS)
  k = rng.randint(-5, 9)
  return rng.choice([(f"greater than {k}", f"x > {k}"), (f"less than {k}", f"x < {k}")])


def _sum_where(rng):
  xs, (what, test) = rng.choice(["xs", "nums"]), _condition(rng)
  name = rng.choice(["sum_if", "total", "add_up"])
  return (name, [xs], f"returns the sum of the numbers in {xs} that are {what}",
          f"Loop over {xs} and add each x with {test} to a running total.",
          ["total = 0", f"for x in {xs}:", f"    if {test}:", "        total += x", "return total"],
          lambda r: (_ints(r),))


def _count_where(rng):
  xs, (what, test) = rng.choice(["xs", "nums"]), _condition(rng)
  name = rng.choice(["count_if", "how_many", "tally"])
  return (name, [xs], f"returns how many numbers in {xs} are {what}",
          f"Loop over {xs} and count each x with {test}.",
          ["count = 0", f"for x in {xs}:", f"    if {test}:", "        count += 1", "return count"],
          lambda r: (_ints(r),))


def _filter_list(rng):
  xs, (what, test) = rng.choice(["xs", "nums"]), _condition(rng)
  name = rng.choice(["keep", "select", "filter_nums"])
  return (name, [xs], f"returns a new list of the numbers in {xs} that are {what}, in order",
          f"Loop over {xs} and append each x with {test}.",
          ["result = []", f"for x in {xs}:", f"    if {test}:", "        result.append(x)",
           "return result"], lambda r: (_ints(r),))


def _fizz(rng):
  name, x = rng.choice(["label", "fizz", "name_of"]), rng.choice(["x", "n"])
  a, b = rng.sample(range(2, 8), 2)
  w1, w2 = rng.sample(["fizz", "buzz", "ping", "pong", "tick"], 2)
  return (name, [x], f"returns '{w1}' if {x} is divisible by {a}, otherwise '{w2}' if {x} is"
          f" divisible by {b}, otherwise str({x})", f"Check {a} first, then {b}, else convert {x}.",
          [f"if {x} % {a} == 0:", f"    return '{w1}'", f"if {x} % {b} == 0:", f"    return '{w2}'",
           f"return str({x})"], lambda r: (_int(r),))


def _piecewise(rng):
  name, x = rng.choice("fgh"), rng.choice(["x", "n"])
  a, b = rng.randint(2, 9), rng.randint(1, 9)
  return (name, [x], f"returns {x} * {a} if {x} is even, otherwise {x} + {b}",
          f"Branch on {x} % 2.", [f"if {x} % 2 == 0:", f"    return {x} * {a}", f"return {x} + {b}"],
          lambda r: (_int(r),))


def _max_below(rng):
  name, xs, k = rng.choice(["max_below", "largest_below"]), rng.choice(["xs", "nums"]), rng.randint(-5, 9)
  default = rng.choice([-1, 0, None])
  return (name, [xs], f"returns the largest number in {xs} that is less than {k}, or {default}"
          " if there is none", f"Loop over {xs}, keeping the largest x < {k} seen so far.",
          ["best = None", f"for x in {xs}:", f"    if x < {k} and (best is None or x > best):",
           "        best = x",
           "return best" if default is None else f"return {default} if best is None else best"],
          lambda r: (_ints(r),))


def _first_index(rng):
  xs, (what, test) = rng.choice(["xs", "nums"]), _condition(rng)
  name = rng.choice(["find", "first_index", "index_of"])
  return (name, [xs], f"returns the index of the first number in {xs} that is {what}, or -1"
          " if there is none", f"Loop with enumerate and return the first i whose x has {test}.",
          [f"for i, x in enumerate({xs}):", f"    if {test}:", "        return i", "return -1"],
          lambda r: (_ints(r),))


def _words_starting(rng):
  name, s, c = rng.choice(["count_words", "words_with"]), rng.choice(["s", "text"]), rng.choice(_LETTERS)
  return (name, [s], f"returns how many words of {s} (split on spaces) start with '{c}'",
          f"Loop over {s}.split() and count words w with w[0] == '{c}'.",
          ["count = 0", f"for w in {s}.split():", f"    if w[0] == '{c}':", "        count += 1",
           "return count"], lambda r: (_sentence(r),))


TEMPLATES: dict[int, tuple[Callable, ...]] = {
    0: (_affine, _square_plus, _two_arg_linear, _div_mod, _diff_times),
    1: (_reverse, _repeat, _count_char, _list_agg, _clamp, _count_kind, _slice_end, _is_multiple,
        _scale_list),
    2: (_sum_where, _count_where, _filter_list, _fizz, _piecewise, _max_below, _first_index,
        _words_starting),
}


# ---------------------------------------------------------------- records ---


def _is_eval_prompt(prompt: str) -> bool:
  digest = hashlib.sha256(prompt.encode()).digest()
  return digest[0] % EVAL_BUCKETS == 0


def _split_seed(seed: int, split: str, level: int) -> int:
  digest = hashlib.sha256(f"code_gen/{seed}/{split}/{level}".encode()).digest()
  return int.from_bytes(digest[:8], "little")


def _draw_prompt(rng: random.Random, level: int) -> tuple[str, tuple]:
  """A template with fresh constants: (prompt text, what `_make_task` needs)."""
  name, params, spec, plan, body, inputs = rng.choice(TEMPLATES[level])(rng)
  signature = f"{name}({', '.join(params)})"
  return f"Write a Python function {signature} that {spec}.", (name, signature, plan, body, inputs)


def _make_task(rng: random.Random, prompt: str, drawn: tuple) -> dict:
  """Writes the solution and computes its tests on random inputs."""
  name, signature, plan, body, inputs = drawn
  solution = f"def {signature}:\n" + "\n".join("    " + line for line in body)
  namespace: dict = {}
  exec(solution, namespace)  # Our own template code, not model output.
  fn = namespace[name]
  tests, seen = [], set()
  for _ in range(TESTS_PER_TASK * 10):
    args = inputs(rng)
    call = f"{name}({', '.join(repr(a) for a in args)})"
    if call in seen:
      continue
    seen.add(call)
    tests.append(f"assert {call} == {fn(*args)!r}")
    if len(tests) == TESTS_PER_TASK:
      break
  return dict(entry_point=name, prompt=prompt, plan=plan, solution=solution, tests=tests)


def make_records(
    split: str = "train", size: int = 1000, seed: int = 0,
    levels: Sequence[int] = LEVELS,
    unique: bool | None = None,
) -> list[dict]:
  """Generates `size` distinct code tasks, spread evenly over `levels`.

  Args:
    split: 'train' or 'eval'; a prompt text belongs to exactly one of them.
    size: number of records.
    seed: base seed; each split and level draws from its own seed.
    levels: difficulty levels to mix (0, 1, 2); record i has level
      levels[i % len(levels)].
    unique: no prompt text twice in the split. Defaults to True for eval and
      False for train: the template space is small (about 1.5k, 1.3k and 5k
      prompts at levels 0, 1, 2, one in EVAL_BUCKETS of them eval), so a large
      train set repeats prompts, each time with fresh test inputs.

  Returns:
    Records in generation order (see the module docstring).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  bad = [level for level in levels if level not in LEVELS]
  if bad or not levels:
    raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {list(levels)}.")
  unique = split == "eval" if unique is None else unique
  rngs = {level: random.Random(_split_seed(seed, split, level)) for level in levels}
  seen: set[str] = set()
  records = []
  for i in range(size):
    level = levels[i % len(levels)]
    for _ in range(_MAX_DRAWS_PER_ITEM):
      prompt, drawn = _draw_prompt(rngs[level], level)
      if _is_eval_prompt(prompt) == (split == "eval") and not (unique and prompt in seen):
        break
    else:
      raise ValueError(
          f"Level {level} has too few distinct {split} prompts left to make {size} records;"
          " ask for fewer."
      )
    seen.add(prompt)
    task = _make_task(rngs[level], prompt, drawn)
    code = f"```python\n{task['solution']}\n```"
    records.append({
        "id": f"code_gen/{split}/{i}",
        "task": "code_gen",
        "level": level,
        "entry_point": task["entry_point"],
        "prompt": task["prompt"],
        "solution": task["solution"],
        "tests": task["tests"],
        "messages": [
            {"role": "user", "content": task["prompt"]},
            {"role": "assistant",
             "content": f"<think>{task['plan']}</think><answer>\n{code}\n</answer>"},
        ],
    })
  return records


def check_disjoint(train: Sequence[dict], eval_: Sequence[dict]) -> None:
  """Raises ValueError if any eval prompt also appears in train."""
  train_prompts = {r["prompt"] for r in train}
  leaked = [r["id"] for r in eval_ if r["prompt"] in train_prompts]
  if leaked:
    raise ValueError(f"{len(leaked)} eval prompts appear in train, e.g. {leaked[:5]}.")


# ---------------------------------------------------------------- scoring ---

_FENCE_RE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_code(completion: str) -> str | None:
  """The code inside the last complete `<answer>...</answer>`, or None.

  A fenced block (```python ... ```) inside the answer is unwrapped; otherwise
  the answer text itself is the code. Empty code is None.
  """
  end = completion.rfind("</answer>")
  if end < 0:
    return None
  start = completion.rfind("<answer>", 0, end)
  if start < 0:
    return None
  answer = completion[start + len("<answer>"):end]
  fence = _FENCE_RE.search(answer)
  code = fence.group(1) if fence else answer
  code = code.strip("\n").rstrip()
  return code if code.strip() else None
