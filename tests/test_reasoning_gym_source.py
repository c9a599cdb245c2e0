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
    ("5 - 3 - 6", "5 - 3 = 2\n2 - 6 = -4", -4),
    ("2 + 3 * 4", "3 * 4 = 12\n2 + 12 = 14", 14),
    ("( 2 + 3 ) * 4", "2 + 3 = 5\n5 * 4 = 20", 20),
    ("-( 1 + 2 ) * -3", "1 + 2 = 3\n-(3) = -3\n-3 * -3 = 9", 9),
    ("7 / 2 - -1", "7 / 2 = 3\n3 - -1 = 4", 4),  # "/" floors, as in reasoning_gym
    ("42", "", 42),
])
def test_arithmetic_trace(expression, trace, value):
  assert rgm.arithmetic_trace(expression) == (trace, value)


def test_gcd_trace():
  assert rgm.gcd_trace([98, 58]) == (
      "98 mod 58 = 40\n58 mod 40 = 18\n40 mod 18 = 4\n18 mod 4 = 2\n4 mod 2 = 0", 2)


def test_every_trace_step_is_correct(splits):
  step = re.compile(r"^(-?\d+) ([-+*/]|mod) (-?\d+) = (-?\d+)$|^-\((-?\d+)\) = (-?\d+)$")
  ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__,
         "mod": int.__mod__}
  for record in splits[0] + splits[1]:
    reply = record["messages"][1]["content"]
    trace = re.fullmatch(r"<think>(.*)</think><answer>(.*)</answer>", reply, re.S)
    assert trace and trace.group(2) == record["answer"], record["id"]
    assert trace.group(1), f"{record['id']}: no trace"
    for line in trace.group(1).split("\n"):
      m = step.match(line)
      assert m, f"{record['id']}: bad step {line!r}"
      if m.group(2):
        assert ops[m.group(2)](int(m.group(1)), int(m.group(3))) == int(m.group(4)), line
      else:
        assert -int(m.group(5)) == int(m.group(6)), line
    if record["task"] != "gcd":  # Euclid ends on "a mod b = 0"; its answer is b
      assert line.endswith(f"= {record['answer']}"), record["id"]


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
