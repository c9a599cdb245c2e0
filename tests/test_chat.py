"""The chat template: layout, assistant-only loss mask, validation errors."""

import numpy as np
import pytest

from data.chat import render_chat, render_prompt
from data.tokenizer import train_tokenizer

_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "<answer>5</answer>"},
    {"role": "tool", "content": "ok"},
    {"role": "assistant", "content": "done"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = [m["content"] for m in _MESSAGES] * 30 + ["the quick brown fox"] * 30
  return train_tokenizer(texts, 300, str(tmp_path_factory.mktemp("tok")))


def test_layout_and_mask(tokenizer):
  ids, mask = render_chat(_MESSAGES, tokenizer)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
  expected_ids, expected_mask = [], []
  for m in _MESSAGES:
    content = tokenizer.encode(m["content"])
    expected_ids += [tokenizer.role_id(m["role"])] + content + [tokenizer.end_id]
    on = m["role"] == "assistant"
    expected_mask += [False] + [on] * len(content) + [on]
  np.testing.assert_array_equal(ids, expected_ids)
  np.testing.assert_array_equal(mask, expected_mask)
  assert tokenizer.decode(ids) == "".join(
      f"<|{m['role']}|>{m['content']}<|end|>" for m in _MESSAGES)


def test_mask_covers_assistant_content_and_end_only(tokenizer):
  ids, mask = render_chat(_MESSAGES[1:3], tokenizer)
  assert tokenizer.decode(ids[mask]) == "<answer>5</answer><|end|>"
  assert ids[mask][-1] == tokenizer.end_id
  assert not mask[ids == tokenizer.role_id("assistant")].any()


def test_prompt_ends_with_assistant_header(tokenizer):
  prompt = render_prompt(_MESSAGES[:2], tokenizer)
  full, _ = render_chat(_MESSAGES[:3], tokenizer)
  assert prompt.dtype == np.int32
  assert prompt[-1] == tokenizer.role_id("assistant")
  np.testing.assert_array_equal(prompt, full[: len(prompt)])


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user", "content": "hi"}, "oops"], "message 1: expected a dict"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "message 1: role 'bot'"),
    ([{"role": "user"}], "message 0: 'content' must be a str"),
    ([{"role": "user", "content": 3}], "message 0: 'content' must be a str"),
])
def test_invalid_messages_name_record_and_index(tokenizer, messages, match):
  with pytest.raises(ValueError, match=match) as error:
    render_chat(messages, tokenizer, record_id="rec/7")
  assert "rec/7" in str(error.value)
