"""Procedural code tasks: well-formed, leak-free, deterministic, and correct."""

import pytest

from data.chat import render_chat
from data.sources import code_tasks as ct
from data.tokenizer import train_tokenizer
from pipeline.sandbox import run_many


@pytest.fixture(scope="module")
def splits():
  return ct.make_records("train", 600, seed=5), ct.make_records("eval", 150, seed=5)


def test_record_format(splits, tmp_path):
  train, eval_ = splits
  tokenizer = train_tokenizer(
      [m["content"] for r in train for m in r["messages"]], 600, str(tmp_path))
  for i, record in enumerate(train):
    assert record["id"] == f"code_gen/train/{i}" and record["task"] == "code_gen"
    assert record["level"] == ct.LEVELS[i % 3]
    assert record["messages"][0] == {"role": "user", "content": record["prompt"]}
    assert record["prompt"].startswith(f"Write a Python function {record['entry_point']}(")
    assert record["solution"].startswith(f"def {record['entry_point']}(")
    assert len(record["tests"]) == ct.TESTS_PER_TASK
    assert all(t.startswith(f"assert {record['entry_point']}(") for t in record["tests"])
    reply = record["messages"][1]["content"]
    assert reply.startswith("<think>") and reply.endswith("\n```\n</answer>")
    assert ct.extract_code(reply) == record["solution"]
    assert len(record["prompt"]) + len(reply) < 500, record["id"]
    ids, mask = render_chat(record["messages"], tokenizer, record_id=record["id"])
    assert tokenizer.decode(ids[mask]).startswith("<think>")
  assert {r["level"] for r in eval_} == set(ct.LEVELS)


def test_splits_disjoint_and_deterministic(splits):
  train, eval_ = splits
  ct.check_disjoint(train, eval_)
  assert len({r["prompt"] for r in eval_}) == len(eval_)  # eval is unique
  assert ct.make_records("eval", 150, seed=5) == eval_
  assert ct.make_records("train", 50, seed=5) == train[:50]
  assert ct.make_records("train", 50, seed=6) != train[:50]
  with pytest.raises(ValueError, match="eval prompts appear in train"):
    ct.check_disjoint(train + eval_[:1], eval_)


def test_solutions_pass_their_tests_in_the_sandbox(splits):
  records = splits[0][:60] + splits[1][:30]
  results = run_many([(ct.extract_code(r["messages"][1]["content"]), r["tests"])
                      for r in records], max_workers=8)
  assert [res.status for res in results] == ["passed"] * len(records)
  # A wrong solution fails: the tests do test something.
  record = records[0]
  wrong = record["solution"].replace("return ", "return 1 + ", 1)
  assert run_many([(wrong, record["tests"])])[0].status == "failed"


def test_all_solutions_pass_with_exec(splits):
  for record in splits[0] + splits[1]:
    namespace = {}
    exec(record["solution"], namespace)
    for test in record["tests"]:
      exec(test, namespace)


@pytest.mark.parametrize("completion, expected", [
    ("<answer>\n```python\ndef f(x):\n    return x\n```\n</answer>", "def f(x):\n    return x"),
    ("<answer>def f(x):\n    return x</answer>", "def f(x):\n    return x"),
    ("<answer>```\nx = 1\n```</answer>", "x = 1"),
    ("<answer>a = 1</answer> then <answer>b = 2</answer>", "b = 2"),
    ("<answer>```python\nx = 1</answer>", "x = 1"),  # unclosed fence
    ("<answer>  </answer>", None),
    ("```python\nx = 1\n```", None),
    ("<answer>x = 1", None),
])
def test_extract_code(completion, expected):
  assert ct.extract_code(completion) == expected


def test_invalid_arguments():
  with pytest.raises(ValueError, match="split must be"):
    ct.make_records("test", 10)
  with pytest.raises(ValueError, match="levels must be"):
    ct.make_records("train", 10, levels=[3])
  with pytest.raises(ValueError, match="too few distinct eval prompts"):
    ct.make_records("eval", 3000, levels=[0])
