"""reasoning_gym math records: correct traces, leak-free splits, scoring."""

import json
import re

import pytest

from data.sources import reasoning_gym_math as rgm


@pytest.fixture(scope="module")
def splits():
  eval_ = rgm.make_records(split="eval", size_per_task=100, seed=3)
  train = rgm.make_records(split="train", size_per_task=300, seed=3)
  return train, eval_


@pytest.mark.parametrize("expression, trace, value", [
    ("5 - 3 - 6", "5 - 3: 5-3=2 = 2\n2 - 6 = -(6 - 2): 6-2=4 = -4", -4),
    ("47 + 85", "47 + 85: 7+5=12, 4+8+1=13 = 132", 132),
    ("83 - 49", "83 - 49: 13-9=4, 8-4-1=3 = 34", 34),
    ("100 - 1", "100 - 1: 10-1=9, 10-0-1=9, 1-0-1=0 = 99", 99),
    ("-23 - -76", "-23 - -76 = 76 - 23: 6-3=3, 7-2=5 = 53", 53),
    ("-39 - 62", "-39 - 62 = -(39 + 62): 9+2=11, 3+6+1=10 = -101", -101),
    ("-5 + 5", "-5 + 5 = 5 - 5: 5-5=0 = 0", 0),
    ("2 + 3 * 4", "3 * 4 = 12\n2 + 12: 2+2=4, 0+1=1 = 14", 14),
    ("( 2 + 3 ) * 4", "2 + 3: 2+3=5 = 5\n5 * 4 = 20", 20),
    ("-( 1 + 2 ) * -3", "1 + 2: 1+2=3 = 3\n-(3) = -3\n-3 * -3 = 9", 9),
    ("7 / 2 - -1", "7 / 2 = 3\n3 - -1 = 3 + 1: 3+1=4 = 4", 4),  # "/" floors, as in reasoning_gym
    ("42", "", 42),
])
def test_arithmetic_trace(expression, trace, value):
  assert rgm.arithmetic_trace(expression) == (trace, value)


def test_gcd_trace():
  assert rgm.gcd_trace([98, 58]) == (
      "98 mod 58 = 40\n58 mod 40 = 18\n40 mod 18 = 4\n18 mod 4 = 2\n4 mod 2 = 0", 2)


_OPS = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__,
        "mod": int.__mod__}
_ONE_LINE = re.compile(r"^(-?\d+) ([*/]|mod) (-?\d+) = (-?\d+)$")
_NEGATION = re.compile(r"^-\((-?\d+)\) = (-?\d+)$")
_ADD_SUB = re.compile(r"^(-?\d+) ([-+]) (-?\d+)(?: = (-?)\(?(\d+) ([-+]) (\d+)\)?)?: (.+) = (-?\d+)$")
_COLUMN = re.compile(r"^(\d+)([-+])(\d)(?:[-+](1))?=(\d+)$")


def _check_columns(x, op, y, columns):
  """The columns of x op y (magnitudes) are the schoolbook algorithm's; returns
  the number they spell."""
  xs, ys = str(x)[::-1], str(y)[::-1]
  assert len(columns) == max(len(xs), len(ys)), columns
  carry, digits = 0, []
  for i, column in enumerate(columns):
    m = _COLUMN.match(column)
    assert m and m.group(2) == op, column
    top, bottom, carry_in, result = int(m.group(1)), int(m.group(3)), int(m.group(4) or 0), int(m.group(5))
    assert carry_in == carry, (column, carry)
    assert bottom == (int(ys[i]) if i < len(ys) else 0), column
    if op == "+":
      assert top == (int(xs[i]) if i < len(xs) else 0), column
      assert top + bottom + carry_in == result, column
      digits.append(str(result) if i == len(columns) - 1 else str(result % 10))
      carry = result // 10
    else:  # a borrowing column writes its top digit plus ten
      assert top in (int(xs[i]), int(xs[i]) + 10) and 0 <= result <= 9, column
      assert top - bottom - carry_in == result, column
      digits.append(str(result))
      carry = int(top >= 10)
  return int("".join(reversed(digits)))


def _check_step(line):
  """Asserts that a trace line's arithmetic is right; returns the value it gives."""
  if m := _ONE_LINE.match(line):
    a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    assert _OPS[op](a, b) == c, line
    return c
  if m := _NEGATION.match(line):
    assert -int(m.group(1)) == int(m.group(2)), line
    return int(m.group(2))
  m = _ADD_SUB.match(line)
  assert m, f"bad step {line!r}"
  a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(9))
  assert _OPS[op](a, b) == c, line
  if m.group(5):  # the signs rewritten as an operation on magnitudes
    sign, x, op2, y = -1 if m.group(4) else 1, int(m.group(5)), m.group(6), int(m.group(7))
  else:
    sign, x, op2, y = 1, a, op, b
  assert x >= 0 and y >= 0 and (op2 == "+" or x >= y), line
  assert sign * _OPS[op2](x, y) == c, line
  assert sign * _check_columns(x, op2, y, m.group(8).split(", ")) == c, line
  return c


def test_every_trace_step_is_correct(splits, level_splits):
  records = splits[0] + splits[1] + level_splits[0] + level_splits[1]
  for record in records:
    reply = record["messages"][1]["content"]
    trace = re.fullmatch(r"<think>(.*)</think><answer>(.*)</answer>", reply, re.S)
    assert trace and trace.group(2) == record["answer"], record["id"]
    assert trace.group(1), f"{record['id']}: no trace"
    values = [_check_step(line) for line in trace.group(1).split("\n")]
    if record["task"] != "gcd":  # Euclid ends on "a mod b = 0"; its answer is b
      assert str(values[-1]) == record["answer"], record["id"]


def test_level_zero_arithmetic_is_sums_and_differences(level_splits):
  for record in level_splits[0] + level_splits[1]:
    if record["task"] in ("basic_arithmetic", "chain_sum") and record["level"] == 0:
      expression = json.loads(record["entry"])["metadata"]["expression"]
      assert re.fullmatch(r"\d+( [-+] \d+)+", expression), (record["id"], expression)


def test_record_format(splits):
  record = splits[0][0]
  assert record["id"] == f"{record['task']}/L0/train/0" and record["level"] == 0
  assert record["messages"][0] == {"role": "user", "content": record["question"]}
  entry = json.loads(record["entry"])
  assert entry["question"] == record["question"] and entry["answer"] == record["answer"]
  assert {r["task"] for r in splits[0]} == set(rgm.DEFAULT_TASKS)


def test_splits_are_disjoint_and_deterministic(splits):
  train, eval_ = splits
  rgm.check_disjoint(train, eval_)
  assert rgm.make_records(split="eval", size_per_task=100, seed=3) == eval_
  with pytest.raises(ValueError, match="eval questions appear in train"):
    rgm.check_disjoint(train + eval_[:1], eval_)


def test_small_task_train_drops_eval_questions():
  # Two one-digit terms: only 200 distinct questions, so overlaps are certain.
  kwargs = {"chain_sum": dict(min_terms=2, max_terms=2, max_digits=1)}
  eval_ = rgm.make_records(["chain_sum"], "eval", 60, 0, kwargs)
  train = rgm.make_records(["chain_sum"], "train", 60, 0, kwargs, eval_guard_size=60)
  rgm.check_disjoint(train, eval_)
  assert len(train) == 60 and train[-1]["id"] != "chain_sum/L0/train/59"  # some dropped
  with pytest.raises(ValueError, match="too few distinct questions"):
    rgm.make_records(["chain_sum"], "train", 60, 0, kwargs)  # guard covers them all


@pytest.fixture(scope="module")
def level_splits():
  levels = (0, 1, 2)
  eval_ = rgm.make_records(split="eval", size_per_task=30, seed=4, levels=levels)
  train = rgm.make_records(split="train", size_per_task=90, seed=4, levels=levels)
  return train, eval_


def _difficulty(record):
  """Operands in the question and lines of the worked trace."""
  reply = record["messages"][1]["content"]
  trace = reply[len("<think>"):reply.index("</think>")]
  return len(re.findall(r"\d+", record["question"])), trace.count("\n") + 1


def test_levels_spread_records_and_get_harder(level_splits):
  train, eval_ = level_splits
  for records, per_level in ((train, 30), (eval_, 10)):
    counts = {}
    for r in records:
      assert r["id"].startswith(f"{r['task']}/L{r['level']}/"), r["id"]
      counts[r["task"], r["level"]] = counts.get((r["task"], r["level"]), 0) + 1
    assert counts == {(t, lv): per_level for t in rgm.DEFAULT_TASKS for lv in (0, 1, 2)}
  assert len({r["id"] for r in train + eval_}) == len(train + eval_)
  for task in rgm.DEFAULT_TASKS:
    means = []
    for level in (0, 1, 2):
      got = [_difficulty(r) for r in train if r["task"] == task and r["level"] == level]
      means.append([sum(d[i] for d in got) / len(got) for i in range(2)])
      meta = [json.loads(r["entry"])["metadata"] for r in train
              if r["task"] == task and r["level"] == level]
      if task == "gcd":
        top = rgm.LEVEL_TASK_KWARGS["gcd"][level]["max_value"]
        assert max(max(m["numbers"]) for m in meta) <= top
      else:
        kwargs = rgm.LEVEL_TASK_KWARGS[task][level]
        terms = range(kwargs["min_terms"], kwargs["max_terms"] + 1)
        assert {m["num_terms"] for m in meta} <= set(terms)
    # Longer traces at every level; more operands, except gcd's two at levels 0 and 1.
    assert means[0][1] < means[1][1] < means[2][1], (task, means)
    assert means[0][0] <= means[1][0] < means[2][0], (task, means)


def test_levels_are_disjoint_stable_and_keep_level_zero(level_splits, splits):
  train, eval_ = level_splits
  rgm.check_disjoint(train, eval_)
  assert rgm.make_records(split="eval", size_per_task=30, seed=4, levels=(0, 1, 2)) == eval_
  # A level's records do not depend on which other levels were asked for, and
  # level 0 is what the default (levels=(0,)) gives.
  only_two = rgm.make_records(split="eval", size_per_task=10, seed=4, levels=(2,))
  assert only_two == [r for r in eval_ if r["level"] == 2]
  default = rgm.make_records(split="eval", size_per_task=10, seed=4)
  assert default == [r for r in eval_ if r["level"] == 0]
  # Train at each level drops the eval questions of every level it was made with.
  small = {"chain_sum": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)}
  eval_small = rgm.make_records(["chain_sum"], "eval", 60, 0, small, levels=(0, 1))
  train_small = rgm.make_records(["chain_sum"], "train", 60, 0, small, levels=(0, 1),
                                 eval_guard_size=30)
  rgm.check_disjoint(train_small, eval_small)


def test_task_kwargs_override_every_level():
  kwargs = {"gcd": dict(max_value=20)}
  records = rgm.make_records(["gcd"], "eval", 30, 0, kwargs, levels=(0, 2))
  numbers = [json.loads(r["entry"])["metadata"]["numbers"] for r in records]
  assert max(max(n) for n in numbers) <= 20
  # Level 2's other kwargs still apply: up to three numbers.
  assert {len(n) for n, r in zip(numbers, records) if r["level"] == 2} == {2, 3}


@pytest.mark.parametrize("levels, match", [
    ((), "levels must be distinct ints"),
    ((0, 3), "levels must be distinct ints"),
    ((1, 1), "levels must be distinct ints"),
    ((True,), "levels must be distinct ints"),
])
def test_bad_levels_are_errors(levels, match):
  with pytest.raises(ValueError, match=match):
    rgm.make_records(split="eval", size_per_task=3, levels=levels)


def test_only_tasks_with_a_level_table_have_levels_above_zero():
  assert rgm.make_records(["leg_counting"], "eval", 2, levels=(1,))[0]["level"] == 1
  assert rgm.make_records(["base_conversion"], "eval", 2)[0]["level"] == 0
  with pytest.raises(ValueError, match="'base_conversion' has no difficulty levels"):
    rgm.make_records(["base_conversion"], "eval", 2, levels=(1,))


@pytest.mark.parametrize("completion, expected", [
    ("<answer>5</answer>", "5"),
    ("<think>x</think><answer> 5 </answer>", "5"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),
    ("<answer>1</answer><answer>2", "1"),
    ("<answer></answer>", None),
    ("<answer>  </answer>", None),
    ("no tags", None),
    ("5</answer>", None),
])
def test_extract_answer(completion, expected):
  assert rgm.extract_answer(completion) == expected


def test_score(splits):
  for record in splits[1]:
    assert rgm.score(record, record["messages"][1]["content"]) == 1.0, record["id"]
    assert rgm.score(record, "<answer>-123456</answer>") == 0.0
    assert rgm.score(record, "<think>no answer</think>") == 0.0
    assert rgm.score(record, "<answer></answer>") == 0.0
  record = next(r for r in splits[1] if len(r["answer"]) == 1)
  padded = f"<answer>9{record['answer']}</answer>"
  assert rgm.score(record, padded) == 0.0
  assert rgm.score(record, padded, partial_credit=True) == 0.5


def test_arithmetic_claims_of_real_traces_are_true(splits, level_splits):
  records = splits[0] + level_splits[0] + level_splits[1]
  claims = [c for r in records for c in rgm.arithmetic_claims(r["messages"][1]["content"])]
  assert len(claims) > 500
  assert all(ok for _, ok in claims), [c for c in claims if not c[1]][:3]
  assert all(rgm.sound(r, r["messages"][1]["content"]) for r in records)


def test_arithmetic_claims_parse_and_check():
  text = ("98 + 22: 8+2=11, 9+2+1=12 = 120\n-45 - -69 = 69 - 45: 9-5=4\n"
          "228 * -66 = -15048\n1597 mod 1038 = 559\n-(15048 - 28) = 1, 10-0-1=9\n"
          "-324360\n-324360 * -9 = 2919240, 5 mod 0 = 1, 2 + 3 = 5.5, 2*3+1=7, 7 = 7")
  assert rgm.arithmetic_claims(text) == [
      ("8+2=11", False), ("9+2+1=12", True), ("9-5=4", True), ("228 * -66 = -15048", True),
      ("1597 mod 1038 = 559", True), ("10-0-1=9", True), ("-324360 * -9 = 2919240", True),
      ("2*3+1=7", True)]


def test_sound_needs_a_right_answer_and_true_claims(splits):
  record = next(r for r in splits[1] if r["task"] == "gcd")
  right = f"<answer>{record['answer']}</answer>"
  assert rgm.sound(record, record["messages"][1]["content"])
  assert not rgm.sound(record, f"<think>12 mod 5 = 3</think>{right}")  # a false claim
  assert not rgm.sound(record, f"<think>guess</think>{right}")  # no claim at all
  assert not rgm.sound(record, "<think>12 mod 5 = 2</think><answer>-1</answer>")


def test_sound_accuracy_in_the_held_out_metrics(splits):
  from pipeline import evaluate
  records = [r for r in splits[1] if r["task"] == "gcd"][:4]
  right = [f"<answer>{r['answer']}</answer>" for r in records]
  completions = [records[0]["messages"][1]["content"], "<think>7 mod 2 = 0</think>" + right[1],
                 right[2], "<answer>-1</answer>"]
  sound = evaluate.sound_flags(records, completions)
  metrics = evaluate.summarize(records, evaluate.score_completions(records, completions), sound)
  assert sound == [True, False, False, False]
  assert metrics["accuracy/gcd"] == 0.75 and metrics["sound_accuracy/gcd"] == 0.25
  assert metrics["sound_accuracy"] == 0.25
