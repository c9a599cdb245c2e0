"""Generated tool-use traces: real tools, agent-format records, scored, leak-free."""

import json
import random
import re
import statistics

import pytest

from data.chat import render_chat
from data.sources import agent
from data.sources import tool_tasks as tt
from data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def splits():
  return tt.make_records("train", 3000, seed=3), tt.make_records("eval", 600, seed=3)


def _question(record):
  return record["messages"][1]["content"]


def _requests(question):
  """A level-2 question split back into its two requests (each ends in . or ?)."""
  return re.split(r"(?<=[.?]) ", question)


def test_every_tool_executes():
  assert 20 <= len(tt.TOOLS) <= 30
  rng = random.Random(0)
  for name, tool in tt.TOOLS.items():
    schema = tool.schema()
    assert schema["name"] == name and schema["parameters"]["required"] == [p for p, _ in tool.params]
    for _ in range(20):
      arguments = tool.draw(rng)
      assert list(arguments) == [p for p, _ in tool.params], name
      result, = tt.execute_calls([{"name": name, "arguments": arguments}])
      assert "error" not in result, (name, arguments, result)
      assert tool.answer(arguments, tool.fn(**arguments))
      for template in tool.questions:  # one sentence, so a level-2 question splits back
        assert len(_requests(template.format(**arguments))) == 1, template
  calls = [{"name": "add_numbers", "arguments": {"a": 2, "b": 3}},
           {"name": "get_capital", "arguments": {"country": "Peru"}},
           {"name": "days_between", "arguments": {"start": "2024-02-27", "end": "2024-03-02"}},
           {"name": "translate", "arguments": {"word": "water", "language": "German"}},
           {"name": "minutes_to_hours", "arguments": {"minutes": 135}},
           {"name": "is_prime", "arguments": {"n": 91}},
           {"name": "convert_currency", "arguments": {"amount": 100, "src": "USD", "dst": "EUR"}}]
  assert tt.execute_calls(calls) == ["5", "Lima", "4", "wasser", '{"hours":2,"minutes":15}',
                                     "false", "92"]
  # Fake-world tools are consistent: the same question, the same answer.
  assert tt.get_weather("Oslo", "celsius") == tt.get_weather("Oslo", "celsius")
  unknown, bad = tt.execute_calls([{"name": "no_such_tool", "arguments": {}},
                                   {"name": "set_alarm", "arguments": {"hour": 7}}])
  assert "error" in json.loads(unknown) and "TypeError" in json.loads(bad)["error"]


def test_record_format(splits, tmp_path):
  train, eval_ = splits
  tokenizer = train_tokenizer([m["content"] for r in train[:600] for m in r["messages"]], 600,
                              str(tmp_path))
  for record in train[:600] + eval_:
    level = record["level"]
    assert record["task"] == "tool_use" and record["category"] == tt.CATEGORIES[level]
    assert re.fullmatch(rf"tool_use/(train|eval)/L{level}/\d+", record["id"])
    system, user, calls_turn, *rest = record["messages"]
    assert system == {"role": "system",
                      "content": agent.SYSTEM_PREFIX + json.dumps(record["tools"], separators=(",", ":"))}
    assert user["role"] == "user" and calls_turn["role"] == "assistant"
    calls = agent.parse_tool_calls(calls_turn["content"])
    assert calls_turn["content"] == agent.format_tool_calls(calls)
    # One tool turn per call with its real result, then the final answer.
    assert [m["role"] for m in rest] == ["tool"] * len(calls) + ["assistant"]
    assert [m["content"] for m in rest[:-1]] == tt.execute_calls(calls)
    assert "<tool_call>" not in rest[-1]["content"]
    assert record["accepted_calls"] == [
        {"name": c["name"], "arguments": {k: [v] for k, v in c["arguments"].items()}} for c in calls]
    assert {c["name"] for c in calls} <= {t["name"] for t in record["tools"]}
    # Every value can be copied from the question.
    for call in calls:
      for value in call["arguments"].values():
        assert str(value) in user["content"], (record["id"], value)
    render_chat(record["messages"], tokenizer, record_id=record["id"])  # the common validation
  assert {r["level"] for r in eval_} == set(tt.LEVELS)


def test_levels_have_their_tools_and_calls(splits):
  for record in splits[0] + splits[1]:
    calls = agent.parse_tool_calls(record["messages"][2]["content"])
    names = [t["name"] for t in record["tools"]]
    assert len(names) == len(set(names)) and not record["ordered"]
    if record["level"] == 0:
      assert len(names) == 1 and len(calls) == 1
    elif record["level"] == 1:
      assert len(names) == 3 and len(calls) == 1
    else:
      assert len(names) == 3 and len(calls) == 2 and calls[0] != calls[1]
      assert len(_requests(_question(record))) == 2
  # Level 1 draws the position of the right tool among the distractors.
  positions = {[t["name"] for t in r["tools"]].index(r["accepted_calls"][0]["name"])
               for r in splits[0] if r["level"] == 1}
  assert positions == {0, 1, 2}
  assert tt.make_records("train", 6, levels=(1,))[0]["level"] == 1


def test_reference_scores_one_and_corruptions_zero(splits):
  for record in splits[0][:900] + splits[1]:
    text = record["messages"][2]["content"]
    calls = agent.parse_tool_calls(text)
    assert agent.score_calls(record, text) == 1.0, record["id"]
    assert agent.score_calls(record, agent.format_tool_calls(calls[::-1])) == 1.0  # any order
    fmt = agent.format_tool_calls
    call, others = calls[0], calls[1:]
    assert agent.score_calls(record, fmt([{**call, "name": call["name"] + "_x"}] + others)) == 0.0
    for key, value in call["arguments"].items():
      wrong = value + 1 if isinstance(value, int) else value + "x"
      assert agent.score_calls(record, fmt([{**call, "arguments": {**call["arguments"], key: wrong}}]
                                           + others)) == 0.0, (record["id"], key)
      missing = {k: v for k, v in call["arguments"].items() if k != key}
      assert agent.score_calls(record, fmt([{**call, "arguments": missing}] + others)) == 0.0
    assert agent.score_calls(record, fmt(calls + calls[:1])) == 0.0  # an extra call
    assert agent.score_calls(record, fmt(calls[:-1])) == 0.0  # a missing call
    assert agent.score_calls(record, "The answer is 5.") == 0.0
  # Numbers match as numbers, strings as BFCL normalises them.
  record = next(r for r in splits[0] if r["level"] < 2 and r["accepted_calls"][0]["name"] == "add_numbers")
  call = agent.parse_tool_calls(record["messages"][2]["content"])[0]
  as_float = {k: float(v) for k, v in call["arguments"].items()}
  assert agent.score_calls(record, agent.format_tool_calls([{**call, "arguments": as_float}])) == 1.0


def test_splits_disjoint_by_construction(splits):
  train, eval_ = splits
  tt.check_disjoint(train, eval_)
  with pytest.raises(ValueError, match="eval questions appear in train"):
    tt.check_disjoint(train + eval_[:1], eval_)
  # No part of an eval question is ever asked in train, at any level.
  train_requests = {q for r in train for q in _requests(_question(r))}
  assert not [r["id"] for r in eval_ for q in _requests(_question(r)) if q in train_requests]
  assert len({_question(r) for r in eval_}) == len(eval_)  # eval is unique
  from pipeline import stage_data  # the runner's check, on what the model is evaluated on
  stage_data.check_no_leak(train, eval_)
  assert stage_data.eval_input(eval_[0]) == eval_[0]["messages"][:2]


def test_deterministic_per_seed(splits):
  train, eval_ = splits
  assert tt.make_records("eval", 600, seed=3) == eval_
  assert tt.make_records("train", 90, seed=3) == train[:90]
  assert tt.make_records("train", 90, seed=4) != train[:90]


def test_lengths(splits, tmp_path):
  train = splits[0]
  chars = {level: [sum(len(m["content"]) for m in r["messages"]) for r in train
                   if r["level"] == level] for level in tt.LEVELS}
  assert max(chars[0]) < 700 and max(chars[1]) < 1100 and max(chars[2]) < 1400
  assert statistics.median(chars[0]) < 450
  # With a tokenizer of the default run's size (1024), trained on these records.
  tokenizer = train_tokenizer([m["content"] for r in train[:1500] for m in r["messages"]], 1024,
                              str(tmp_path))
  tokens = {level: [len(render_chat(r["messages"], tokenizer)[0]) for r in train[:1500]
                    if r["level"] == level] for level in tt.LEVELS}
  assert statistics.median(tokens[0]) < 200 and max(tokens[0]) < 256
  # The calls (what the model is scored on) always fit the overall SFT's 384 tokens.
  assert max(len(render_chat(r["messages"][:3], tokenizer)[0]) for r in train[:1500]) < 384


def test_invalid_arguments(monkeypatch):
  with pytest.raises(ValueError, match="split must be one of"):
    tt.make_records("test", 4)
  with pytest.raises(ValueError, match="levels must be a non-empty subset"):
    tt.make_records("train", 4, levels=(3,))
  with pytest.raises(ValueError, match="size must be an int >= 0"):
    tt.make_records("train", -1)
  # A split that runs out of distinct questions says so: one tool of 60 questions.
  monkeypatch.setattr(tt, "TOOL_NAMES", ("get_time_zone",))
  with pytest.raises(ValueError, match="too few distinct eval questions.*ask for fewer"):
    tt.make_records("eval", 60, levels=(0,))


def test_scored_and_rewarded_like_agent_records(splits):
  from pipeline import evaluate, rewards, stage_data
  records = splits[1][:3]
  good = [r["messages"][2]["content"] for r in records]
  assert evaluate.score_completions(records, good) == [1.0] * 3
  metrics = evaluate.summarize(records + [{"task": "agent"}], [1.0] * 3 + [0.0])
  assert metrics == {"call_accuracy/tool_use": 1.0, "call_accuracy/agent": 0.0}
  assert rewards.agent_reward([""] * 3, good[:2] + ["no call"], records=records) == [1.0, 1.0, 0.0]
  assert rewards.format_reward([""] * 2, good[:1] + ["<think>x</think><answer>y</answer>"],
                               records=records[:2]) == [1.0, 0.0]
  made = stage_data.SOURCE_KINDS["tool_use"].make_records("eval", 3, 3, levels=(0, 1, 2))
  assert made == records
