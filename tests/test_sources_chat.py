"""Conversation records: alternating turns, short, split by conversation."""

import pytest

from data.chat import render_chat
from data.sources import chat
from data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def splits():
  return chat.make_records("train"), chat.make_records("eval")


def test_record_format(splits, tmp_path):
  train, eval_ = splits
  tokenizer = train_tokenizer(
      [m["content"] for r in train[:1500] for m in r["messages"]], 600, str(tmp_path))
  for record in train + eval_:
    assert record["task"] == "chat" and record["source"] in chat.SOURCES
    assert record["id"].startswith(record["source"] + "/")
    messages = record["messages"]
    assert 2 <= len(messages) <= chat.MAX_MESSAGES and len(messages) % 2 == 0
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    assert all(0 < len(m["content"]) <= chat.MAX_CHARS for m in messages)
    assert all(m["content"] == m["content"].strip() for m in messages)
    assert record["prompt_key"] == chat.normalize_prompt(messages[0]["content"])
    if record["source"] == "chatterbot":
      assert record["rating"] is None
  for record in train[:300]:
    render_chat(record["messages"], tokenizer, record_id=record["id"])
  rated = [r for r in train if r["rating"] is not None]
  assert len(rated) > 2000 and all(r["source"] == "chitchat" for r in rated)
  assert all(1 <= r["rating"] <= 10 and set(r["ratings"]) == {"interesting", "upbeat", "witty"}
             for r in rated)


def test_sizes_and_sources(splits):
  train, eval_ = splits
  for split in (train, eval_):
    assert {r["source"] for r in split} == set(chat.SOURCES)
  assert 3000 < len(train) and 300 < len(eval_) < len(train) / 5


def test_splits_disjoint_and_deterministic(splits):
  train, eval_ = splits
  chat.check_disjoint(train, eval_)
  # chatterbot splits by question, so no eval question has a train answer.
  train_keys = {r["prompt_key"] for r in train if r["source"] == "chatterbot"}
  assert not [r for r in eval_ if r["source"] == "chatterbot" and r["prompt_key"] in train_keys]
  assert chat.make_records("eval", 50, seed=2) == chat.make_records("eval", 50, seed=2)
  assert chat.make_records("eval", 50, seed=2) != chat.make_records("eval", 50, seed=3)
  assert {r["id"] for r in chat.make_records("eval", seed=9)} == {r["id"] for r in eval_}
  with pytest.raises(ValueError, match="eval conversations appear in train"):
    chat.check_disjoint(train + eval_[:1], eval_)


def test_options():
  records = chat.make_records("eval", 20, sources=("chitchat",), system="Be kind.",
                              max_messages=2, max_chars=80)
  for record in records:
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
    assert record["messages"][0]["content"] == "Be kind."
    assert all(len(m["content"]) <= 80 for m in record["messages"])
  with pytest.raises(ValueError, match="sources must be"):
    chat.make_records("train", sources=("reddit",))
  with pytest.raises(ValueError, match="split must be"):
    chat.make_records("dev")
  with pytest.raises(ValueError, match="asked for size"):
    chat.make_records("eval", 10**6)


@pytest.mark.parametrize("utterances, expected", [
    ([("a", "hi"), ("a", "there"), ("b", "hello")], [("user", "hi there"), ("assistant", "hello")]),
    ([("a", "hi"), ("b", "yo"), ("a", "bye")], [("user", "hi"), ("assistant", "yo")]),
    ([("a", "x" * 300), ("b", "yo")], []),
    ([("a", "hi"), ("b", "  yo \n there ")], [("user", "hi"), ("assistant", "yo there")]),
    ([("a", "hi")], []),
])
def test_turns(utterances, expected):
  messages = chat._turns(utterances, chat.MAX_MESSAGES, chat.MAX_CHARS)
  assert [(m["role"], m["content"]) for m in messages] == expected
