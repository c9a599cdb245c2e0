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
  assert record["id"] == f"{record['task']}/train/0"
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
  assert len(train) == 60 and train[-1]["id"] != "chain_sum/train/59"  # some dropped
  with pytest.raises(ValueError, match="too few distinct questions"):
    rgm.make_records(["chain_sum"], "train", 60, 0, kwargs)  # guard covers them all


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
