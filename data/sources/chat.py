"""Human conversation from chitchat-dataset and chatterbot-corpus as chat records.

A record is
    {"id": "chitchat/<uuid>", "task": "chat", "source": "chitchat"|"chatterbot",
     "messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...],
     "prompt_key": "hello", "rating": 5.0 | None, "ratings": {...} | None,
     "topic": str | None}

The first speaker of a conversation is the user and the other the assistant;
consecutive messages by one speaker are merged. A conversation is cut before
its first message longer than `max_chars` and after `max_messages` messages,
and always ends on an assistant turn; one left without a user/assistant pair
is dropped (chitchat has ~3,150 one-speaker conversations).

`rating` (chitchat only) is the mean of the raters' witty/upbeat/interesting
scores for the whole conversation; `prompt_key` is the normalised first user
turn, so records with the same key answer the same opening and can be paired
by rating for preference data. `topic` is the conversation starter chitchat
showed its participants (not part of the messages).

The split is by conversation: a hash puts one conversation in EVAL_BUCKETS in
eval, so an eval conversation is never in train. Chitchat hashes its
conversation id; chatterbot-corpus repeats exchanges verbatim (dropped here)
and asks one question in several files, so it hashes the normalised question,
which keeps every answer to an eval question out of train.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import random
import re

import chatterbot_corpus
import chitchat_dataset
import yaml

SPLITS = ("train", "eval")
SOURCES = ("chitchat", "chatterbot")
EVAL_BUCKETS = 10
MAX_MESSAGES = 6
MAX_CHARS = 200
# libyaml's loader is several times faster; PyYAML without it has only the other.
_YAML_LOADER = yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader


def _is_eval(conversation_id: str) -> bool:
  return hashlib.sha256(conversation_id.encode()).digest()[0] % EVAL_BUCKETS == 0


def normalize_prompt(text: str) -> str:
  """Lower case, letters/digits/spaces only, single spaces: "Hello?!" -> "hello"."""
  return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def _turns(utterances: list[tuple[str, str]], max_messages: int, max_chars: int) -> list[dict]:
  """(speaker, text) pairs -> alternating user/assistant messages, cut short."""
  merged: list[list] = []
  for speaker, text in utterances:
    text = " ".join(text.split())
    if not text:
      continue
    if merged and merged[-1][0] == speaker:
      merged[-1][1] += " " + text
    else:
      merged.append([speaker, text])
  messages = []
  for i, (_, text) in enumerate(merged[:max_messages]):
    if len(text) > max_chars:
      break
    messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
  if len(messages) % 2:
    messages.pop()
  return messages


@functools.lru_cache(maxsize=1)
def _chitchat() -> dict:
  return chitchat_dataset.Dataset()


@functools.lru_cache(maxsize=4)
def _chitchat_conversations(max_messages: int, max_chars: int) -> tuple[dict, ...]:
  records = []
  for conversation_id, conversation in _chitchat().items():
    utterances = [(u["sender"], u["text"]) for group in conversation["messages"] for u in group]
    messages = _turns(utterances, max_messages, max_chars)
    if not messages:
      continue
    ratings = conversation.get("ratings") or None
    records.append({
        "id": f"chitchat/{conversation_id}",
        "split_key": conversation_id,
        "source": "chitchat",
        "messages": messages,
        "rating": round(sum(ratings.values()) / len(ratings), 3) if ratings else None,
        "ratings": dict(sorted(ratings.items())) if ratings else None,
        "topic": conversation.get("prompt"),
    })
  return tuple(records)


@functools.lru_cache(maxsize=None)
def _chatterbot_files(language: str) -> tuple[str, ...]:
  folder = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", language)
  files = tuple(sorted(glob.glob(os.path.join(folder, "*.yml"))))
  if not files:
    raise ValueError(f"chatterbot-corpus has no YAML files for language {language!r} in {folder}.")
  return files


@functools.lru_cache(maxsize=4)
def _chatterbot_conversations(
    languages: tuple[str, ...], max_messages: int, max_chars: int
) -> tuple[dict, ...]:
  records, seen = [], set()
  for language in languages:
    for path in _chatterbot_files(language):
      with open(path, encoding="utf-8") as f:
        data = yaml.load(f, Loader=_YAML_LOADER)
      if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        raise ValueError(f"{path}: expected a mapping with a 'conversations' list.")
      category = os.path.splitext(os.path.basename(path))[0]
      for index, conversation in enumerate(data["conversations"]):
        # YAML turns bare answers like `1963` or `yes` into ints and bools.
        utterances = [(i % 2, str(text)) for i, text in enumerate(conversation)]
        messages = _turns(utterances, max_messages, max_chars)
        # tech_support.yml repeats some exchanges 100 times; keep the first.
        content = tuple(m["content"] for m in messages)
        if messages and content not in seen:
          seen.add(content)
          records.append({
              "id": f"chatterbot/{language}/{category}/{index}",
              # The corpus asks one question in several files and exchanges;
              # splitting by it keeps every answer to an eval question out of train.
              "split_key": normalize_prompt(messages[0]["content"]),
              "source": "chatterbot",
              "messages": messages,
              "rating": None,
              "ratings": None,
              "topic": category,
          })
  return tuple(records)


def make_records(
    split: str = "train",
    size: int | None = None,
    seed: int = 0,
    *,
    sources: tuple[str, ...] = SOURCES,
    languages: tuple[str, ...] = ("english",),
    max_messages: int = MAX_MESSAGES,
    max_chars: int = MAX_CHARS,
    system: str | None = None,
) -> list[dict]:
  """Conversation records of one split, shuffled by `seed`.

  Args:
    split: 'train' or 'eval' (one conversation id in EVAL_BUCKETS).
    size: how many to return; None for all. More than the split holds is an
      error.
    seed: shuffle seed; the split itself does not depend on it.
    sources: any of 'chitchat', 'chatterbot'.
    languages: chatterbot-corpus language folders.
    max_messages: messages per conversation at most (before the system one).
    max_chars: a conversation is cut before its first longer message.
    system: optional system message put first in every record.

  Returns:
    Records (see the module docstring).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  unknown = set(sources) - set(SOURCES)
  if unknown or not sources:
    raise ValueError(f"sources must be a non-empty subset of {SOURCES}, got {sources!r}.")
  if max_messages < 2:
    raise ValueError(f"max_messages must be at least 2 (one exchange), got {max_messages}.")
  conversations = []
  if "chitchat" in sources:
    conversations += _chitchat_conversations(max_messages, max_chars)
  if "chatterbot" in sources:
    conversations += _chatterbot_conversations(tuple(languages), max_messages, max_chars)
  # chitchat holds some conversations verbatim under two ids: keep the first,
  # or the two copies could land in different splits.
  seen, unique = set(), []
  for c in conversations:
    content = json.dumps(c["messages"], sort_keys=True)
    if content not in seen:
      seen.add(content)
      unique.append(c)
  conversations = [c for c in unique if _is_eval(c["split_key"]) == (split == "eval")]
  if size is None:
    size = len(conversations)
  if not 0 <= size <= len(conversations):
    raise ValueError(
        f"The {split} split of {sources} has {len(conversations)} conversations; asked for"
        f" size={size}."
    )
  random.Random(seed).shuffle(conversations)
  records = []
  for conversation in conversations[:size]:
    # Copies: the conversations are cached and callers may edit records.
    messages = [dict(m) for m in conversation["messages"]]
    if system is not None:
      messages = [{"role": "system", "content": system}] + messages
    records.append({
        **{k: v for k, v in conversation.items() if k != "split_key"},
        "task": "chat",
        "messages": messages,
        "ratings": dict(conversation["ratings"]) if conversation["ratings"] else None,
        "prompt_key": normalize_prompt(conversation["messages"][0]["content"]),
    })
  return records


def check_disjoint(train: list[dict], eval_: list[dict]) -> None:
  """Raises ValueError if any eval conversation id also appears in train."""
  train_ids = {r["id"] for r in train}
  leaked = [r["id"] for r in eval_ if r["id"] in train_ids]
  if leaked:
    raise ValueError(f"{len(leaked)} eval conversations appear in train, e.g. {leaked[:5]}.")
