"""The chat template: role header, content, end of turn, for every message.

    <|user|>What is 2 + 3?<|end|><|assistant|><think>2 + 3 = 5</think><answer>5</answer><|end|>

There is no BOS: a sequence starts with its first role header. The loss mask
covers assistant content and the assistant's `<|end|>`, so the model learns
both what to say and when to stop, and never learns to predict prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from data.tokenizer import ROLES, Tokenizer


def _validate(messages: Any, record_id: Any) -> None:
  where = f"record {record_id!r}" if record_id is not None else "chat"
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f"{where}: 'messages' must be a non-empty list, got {messages!r:.80}.")
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ValueError(f"{where}, message {i}: expected a dict, got {type(message).__name__}.")
    if message.get("role") not in ROLES:
      raise ValueError(
          f"{where}, message {i}: role {message.get('role')!r} is not one of {ROLES}."
      )
    if not isinstance(message.get("content"), str):
      raise ValueError(
          f"{where}, message {i}: 'content' must be a str, got"
          f" {type(message.get('content')).__name__}."
      )


def render_chat(
    messages: Sequence[dict], tokenizer: Tokenizer, *, record_id: Any = None
) -> tuple[np.ndarray, np.ndarray]:
  """Renders a conversation to token ids and an assistant loss mask.

  Args:
    messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...].
    tokenizer: the tokenizer whose special ids frame each turn.
    record_id: named in the error if the messages are malformed.

  Returns:
    (ids int32 [T], mask bool [T]); mask is True on assistant content tokens
    and the assistant's `<|end|>`, False on role headers and other turns.
  """
  _validate(messages, record_id)
  if not isinstance(tokenizer, Tokenizer):  # a checkpoint's own (data/hf_tokenizer.py)
    return tokenizer.render_chat(messages, record_id=record_id)
  ids, mask = [], []
  for message in messages:
    content = tokenizer.encode(message["content"])
    is_assistant = message["role"] == "assistant"
    ids += [tokenizer.role_id(message["role"])] + content + [tokenizer.end_id]
    mask += [False] + [is_assistant] * (len(content) + 1)
  return np.asarray(ids, np.int32), np.asarray(mask, bool)


def render_prompt(messages: Sequence[dict], tokenizer: Tokenizer) -> np.ndarray:
  """Renders the messages, then an `<|assistant|>` header for generation.

  The model is expected to continue with the reply content and `<|end|>`.

  Returns:
    int32 [T] prompt ids.
  """
  if not isinstance(tokenizer, Tokenizer):  # a checkpoint's own (data/hf_tokenizer.py)
    _validate(messages, None)
    return tokenizer.render_prompt(messages)
  ids, _ = render_chat(messages, tokenizer)
  return np.concatenate([ids, np.asarray([tokenizer.role_id("assistant")], np.int32)])
