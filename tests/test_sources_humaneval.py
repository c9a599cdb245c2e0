"""HumanEval records: fixed leak-free split, runnable tests, eval without targets."""

import pytest

from data.chat import render_chat
from data.sources import code_tasks
from data.sources import humaneval as he
from data.tokenizer import train_tokenizer
from pipeline.sandbox import run_many


@pytest.fixture(scope="module")
def splits():
  return he.make_records("train"), he.make_records("eval")


def test_split_sizes_and_disjoint(splits):
  train, eval_ = splits
  assert (len(train), len(eval_)) == (164 - he.EVAL_SIZE, he.EVAL_SIZE)
  he.check_disjoint(train, eval_)
  assert {r["task_id"] for r in train + eval_} == {f"HumanEval/{i}" for i in range(164)}
  with pytest.raises(ValueError, match="eval problems appear in train"):
    he.check_disjoint(train + eval_[:1], eval_)


def test_deterministic(splits):
  assert he.make_records("eval", seed=0) == splits[1]
  assert he.make_records("train", 10, seed=3) == he.make_records("train", 10, seed=3)
  assert [r["task_id"] for r in he.make_records("train", seed=3)] != [r["task_id"] for r in splits[0]]
  assert sorted(r["task_id"] for r in he.make_records("train", seed=3)) == sorted(
      r["task_id"] for r in splits[0])
  with pytest.raises(ValueError, match="has 40 problems"):
    he.make_records("eval", 41)


def test_record_format(splits, tmp_path):
  train, eval_ = splits
  tokenizer = train_tokenizer(
      [m["content"] for r in train for m in r["messages"]], 600, str(tmp_path))
  for record in train + eval_:
    assert record["task"] == "humaneval" and record["id"] == f"humaneval/{record['task_id']}"
    assert record["messages"][0]["content"].endswith(record["prompt"])
    assert record["tests"][0].rstrip().endswith(f"check({record['entry_point']})")
    render_chat(record["messages"], tokenizer, record_id=record["id"])
  # Canonical solutions are targets for train problems only.
  assert all(len(r["messages"]) == 2 for r in train)
  assert all(len(r["messages"]) == 1 for r in eval_)


def test_canonical_solutions_pass(splits):
  records = splits[0][:8]
  programs = [code_tasks.extract_code(r["messages"][1]["content"]) for r in records]
  assert all(p.startswith(r["prompt"].strip("\n")) for p, r in zip(programs, records))
  results = run_many([(p, r["tests"]) for p, r in zip(programs, records)], max_workers=8)
  assert [res.status for res in results] == ["passed"] * len(records)
  # The check really checks: a stub that returns None fails.
  stub = records[0]["prompt"] + "    return None\n"
  assert run_many([(stub, records[0]["tests"])])[0].status == "failed"
