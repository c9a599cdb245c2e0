"""BFCL tool-use traces: well-formed, leak-free, really executed, scored."""

import json

import pytest

from data.chat import render_chat
from data.sources import agent
from data.tokenizer import train_tokenizer


def _calls_text(record):
  return "\n".join(m["content"] for m in record["messages"]
                   if m["role"] == "assistant" and "<tool_call>" in m["content"])


@pytest.fixture(scope="module")
def splits():
  return agent.make_records("train"), agent.make_records("eval")


def test_record_format(splits, tmp_path):
  train, eval_ = splits
  tokenizer = train_tokenizer(
      [m["content"] for r in train for m in r["messages"]], 600, str(tmp_path))
  for record in train + eval_:
    assert record["task"] == "agent" and record["category"] in agent.DEFAULT_CATEGORIES
    assert record["id"] == f"agent/{record['category']}/{record['bfcl_id']}"
    system, user = record["messages"][:2]
    assert system["role"] == "system" and user["role"] == "user"
    tools = json.loads(system["content"][len(agent.SYSTEM_PREFIX):])
    assert tools == record["tools"] and len(system["content"]) - len(agent.SYSTEM_PREFIX) <= 600
    assert {c["name"] for c in record["accepted_calls"]} <= {t["name"] for t in record["tools"]}
    render_chat(record["messages"], tokenizer, record_id=record["id"])
  categories = {r["category"] for r in train}
  assert categories == {"simple", "parallel", "multi_turn_base"}


def test_splits_disjoint_and_deterministic(splits):
  train, eval_ = splits
  agent.check_disjoint(train, eval_)
  assert 400 < len(train) and 60 < len(eval_) < len(train) / 3
  assert agent.make_records("eval", seed=0) == eval_
  assert agent.make_records("train", 30, seed=1) != train[:30]
  with pytest.raises(ValueError, match="eval items appear in train"):
    agent.check_disjoint(train + eval_[:1], eval_)
  with pytest.raises(ValueError, match="categories must be"):
    agent.make_records("train", categories=("exec_simple",))


def test_reference_traces_score_one(splits):
  for record in splits[0] + splits[1]:
    assert agent.score_calls(record, _calls_text(record)) == 1.0, record["id"]


def test_corrupted_calls_score_zero(splits):
  for record in splits[0] + splits[1]:
    text = _calls_text(record)
    calls = agent.parse_tool_calls(text)
    assert agent.score_calls(record, text.replace("</tool_call>", "", 1)) == 0.0  # malformed
    assert agent.score_calls(record, text.replace('"arguments": {', '"arguments": {{', 1)) == 0.0
    assert agent.score_calls(record, "I would call a tool.") == 0.0
    wrong_name = [{**calls[0], "name": calls[0]["name"] + "_x"}] + calls[1:]
    assert agent.score_calls(record, agent.format_tool_calls(wrong_name)) == 0.0
    assert agent.score_calls(record, agent.format_tool_calls(calls[:-1])) == 0.0  # one missing
    assert agent.score_calls(record, agent.format_tool_calls(calls + calls[:1])) == 0.0  # extra
    extra_argument = [{**calls[0], "arguments": {**calls[0]["arguments"], "zzz": 1}}] + calls[1:]
    assert agent.score_calls(record, agent.format_tool_calls(extra_argument)) == 0.0
    for key, value in calls[0]["arguments"].items():
      wrong = 987654 if isinstance(value, str) else "wrong value"
      bad = [{**calls[0], "arguments": {**calls[0]["arguments"], key: wrong}}] + calls[1:]
      assert agent.score_calls(record, agent.format_tool_calls(bad)) == 0.0, (record["id"], key)


def test_parallel_calls_in_any_order(splits):
  record = next(r for r in splits[0] if r["category"] == "parallel"
                and len({json.dumps(c) for c in agent.parse_tool_calls(_calls_text(r))}) > 1)
  calls = agent.parse_tool_calls(_calls_text(record))
  assert agent.score_calls(record, agent.format_tool_calls(calls[::-1])) == 1.0
  ordered = next(r for r in splits[0] if r["ordered"])
  calls = agent.parse_tool_calls(_calls_text(ordered))
  assert agent.score_calls(ordered, agent.format_tool_calls(calls[::-1])) == 0.0


def test_scoring_equivalences():
  record = {"ordered": False, "accepted_calls": [
      {"name": "f", "arguments": {"x": [10], "unit": ["units", ""], "flag": [True],
                                  "city": ["New York, NY"], "xs": [[1, 2]]}}]}
  def score(arguments):
    return agent.score_calls(record, agent.format_tool_calls([{"name": "f", "arguments": arguments}]))
  base = {"x": 10, "flag": True, "city": "New York, NY", "xs": [1, 2]}
  assert score(base) == 1.0
  assert score({**base, "x": 10.0, "unit": "units", "city": "new york ny"}) == 1.0
  assert score({**base, "flag": 1}) == 0.0  # a bool is not an int
  assert score({**base, "xs": [2, 1]}) == 0.0
  assert score({k: v for k, v in base.items() if k != "x"}) == 0.0  # required
  assert agent.parse_tool_calls('<tool_call>{"name": "f"}</tool_call>') is None
  assert agent.parse_tool_calls('<tool_call>[1]</tool_call>') is None
  assert agent.parse_tool_calls('x <tool_call>{"name": "f", "arguments": {}}</tool_call> y') == [
      {"name": "f", "arguments": {}}]


def test_executed_traces_replay(splits):
  executed = [r for r in splits[0] + splits[1] if r["category"] == "multi_turn_base"]
  assert len(executed) > 80
  for record in executed:
    messages = record["messages"]
    calls = agent.parse_tool_calls(_calls_text(record))
    results = [m["content"] for m in messages if m["role"] == "tool"]
    assert len(results) == len(calls) and messages[-1]["role"] == "assistant"
    assert [m["role"] for m in messages[2:-1]] == ["assistant", "tool"] * len(calls)
    assert agent.execute_calls(record["env"], calls) == results, record["id"]
  # Calls that the back end rejects give an error result, not an exception.
  record = executed[0]
  assert "error" in agent.execute_calls(record["env"], [{"name": "no_such_tool", "arguments": {}}])[0]
