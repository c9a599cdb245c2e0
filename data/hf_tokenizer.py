"""A Hugging Face checkpoint's tokenizer and chat template, for imported models.

Same interface as `data.tokenizer.Tokenizer` (vocab_size, pad_id, end_id,
encode, decode, fingerprint, save, load) plus `render_chat` / `render_prompt`,
which `data/chat.py` hands over to for any tokenizer that is not our
sentencepiece one: a pretrained model must see the template it was tuned with.

The template (tokenizer_config.json's `chat_template`, or `chat_template.jinja`)
is rendered with jinja2 as transformers does. The loss mask is found in the
rendered text: assistant turn i starts where the prompt rendering of
messages[:i] (with the generation prompt) ends, and runs to the end-of-turn
token after it, inclusive. That holds for templates that rewrite earlier
turns (Qwen3 drops the <think> block of turns before the last user query),
where rendering the conversation turn by turn would not give one consistent
text. The text is then encoded piece by piece at those boundaries, so the
mask is exact by construction.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers

TOKENIZER_FILE = 'tokenizer.json'
TOKENIZER_CONFIG = 'tokenizer_config.json'
TEMPLATE_FILE = 'chat_template.jinja'
# What `save` copies: enough for `load` and for transformers' AutoTokenizer;
# config.json for the embedding rows (vocab_size) and token ids.
FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG, TEMPLATE_FILE, 'special_tokens_map.json',
         'generation_config.json', 'config.json')


def is_hf_tokenizer_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, TOKENIZER_FILE))


def _token_text(value) -> str | None:
  """tokenizer_config writes special tokens as strings or AddedToken dicts."""
  if isinstance(value, dict):
    return value.get('content')
  return value


class HFTokenizer:
  """tokenizer.json (the `tokenizers` library) + the checkpoint's chat template."""

  def __init__(self, path: str, *, end_token: str | None = None):
    """Loads the tokenizer files of the checkpoint folder `path`.

    Args:
      path: a Hugging Face checkpoint folder (or a copy written by `save`).
      end_token: the token that ends an assistant turn; by default found by
        rendering a probe conversation with the template (`<|eot_id|>` for
        Llama 3, `<|im_end|>` for Qwen).
    """
    self.path = path
    file = os.path.join(path, TOKENIZER_FILE)
    if not os.path.exists(file):
      raise FileNotFoundError(f'{path}: no {TOKENIZER_FILE} (only fast tokenizers are '
                              'supported: save one with transformers first)')
    with open(file, 'rb') as f:
      self._json = f.read()
    self._tok = tokenizers.Tokenizer.from_str(self._json.decode())
    config_file = os.path.join(path, TOKENIZER_CONFIG)
    config = {}
    if os.path.exists(config_file):
      with open(config_file) as f:
        config = json.load(f)
    self.chat_template = self._template(config, path)
    self._env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    self._env.filters['tojson'] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    self._env.globals['raise_exception'] = _raise
    self._env.globals['strftime_now'] = lambda fmt: '26 Jul 2024'  # reproducible renders
    self._compiled = self._env.from_string(self.chat_template)
    self._specials = {k: _token_text(config.get(k)) for k in ('bos_token', 'eos_token')}
    self.end_token = end_token or self._find_end_token()
    self._end_id = self._single_id(self.end_token, 'end-of-turn token')
    pad = _token_text(config.get('pad_token'))
    self._pad_id = self._single_id(pad, 'pad_token') if pad else self._end_id
    model_config = os.path.join(path, 'config.json')
    self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    if os.path.exists(model_config):
      with open(model_config) as f:
        # Embedding tables are often padded past the tokenizer (Qwen: 151936).
        self._vocab_size = max(self._vocab_size, int(json.load(f).get('vocab_size', 0)))

  @staticmethod
  def _template(config: dict, path: str) -> str:
    template = config.get('chat_template')
    if isinstance(template, list):  # [{'name': 'default', 'template': ...}, ...]
      template = {t['name']: t['template'] for t in template}.get('default')
    if not template and os.path.exists(os.path.join(path, TEMPLATE_FILE)):
      with open(os.path.join(path, TEMPLATE_FILE)) as f:
        template = f.read()
    if not template:
      raise ValueError(f'{path}: no chat template ({TOKENIZER_CONFIG} has no "chat_template" '
                       f'and there is no {TEMPLATE_FILE}); a base model needs one added')
    return template

  def _single_id(self, token: str, what: str) -> int:
    ids = self._tok.encode(token, add_special_tokens=False).ids
    if len(ids) != 1:
      raise ValueError(f'{self.path}: {what} {token!r} is not a single token (ids {ids})')
    return ids[0]

  def _find_end_token(self) -> str:
    """The first special token the template writes after an assistant reply."""
    probe = [{'role': 'user', 'content': 'ping'}, {'role': 'assistant', 'content': 'pong'}]
    text = self.template_text(probe)
    start = text.rfind('pong') + len('pong')
    specials = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
    found = [(text.find(t, start), t) for t in specials if text.find(t, start) >= 0]
    if not found:
      raise ValueError(f'{self.path}: the chat template writes no special token after an '
                       'assistant reply; pass end_token= explicitly')
    return min(found)[1]

  @classmethod
  def load(cls, path: str) -> HFTokenizer:
    return cls(path)

  def save(self, path: str) -> None:
    """Copies the tokenizer files (and the template) into the folder `path`."""
    os.makedirs(path, exist_ok=True)
    for name in FILES:
      src = os.path.join(self.path, name)
      if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(
          os.path.join(path, name)):
        shutil.copy(src, os.path.join(path, name))
    if not os.path.exists(os.path.join(path, TEMPLATE_FILE)):
      with open(os.path.join(path, TEMPLATE_FILE), 'w') as f:
        f.write(self.chat_template)

  @property
  def vocab_size(self) -> int:
    """Rows of the embedding table: config.json's vocab_size when it is larger."""
    return self._vocab_size

  @property
  def pad_id(self) -> int:
    """tokenizer_config's pad_token, else the end-of-turn token."""
    return self._pad_id

  @property
  def end_id(self) -> int:
    return self._end_id

  def encode(self, text: str) -> list[int]:
    """Ids of `text`; special-token strings in it map to their ids, as in
    transformers' chat templates."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` with special tokens kept, padding dropped."""
    return self._tok.decode([int(i) for i in ids if int(i) != self._pad_id],
                            skip_special_tokens=False)

  def fingerprint(self) -> str:
    """Hash of the vocabulary, the template and the end token."""
    h = hashlib.sha256(self._json)
    h.update(self.chat_template.encode())
    h.update(self.end_token.encode())
    return h.hexdigest()[:16]

  def template_text(self, messages: Sequence[dict], *,
                    add_generation_prompt: bool = False) -> str:
    """The template's text for `messages` (as transformers' apply_chat_template)."""
    return self._compiled.render(messages=list(messages),
                                 add_generation_prompt=add_generation_prompt,
                                 **{k: v or '' for k, v in self._specials.items()})

  def render_chat(self, messages: Sequence[dict], *,
                  record_id: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [T], mask bool [T]): the mask covers each assistant turn's
    rendered reply and its end-of-turn token, nothing else."""
    where = f'record {record_id!r}' if record_id is not None else 'chat'
    text = self.template_text(messages)
    spans = []
    for i, message in enumerate(messages):
      if message['role'] != 'assistant':
        continue
      prompt = self.template_text(messages[:i], add_generation_prompt=True)
      if not text.startswith(prompt):
        raise ValueError(f'{where}, message {i}: the chat template renders the prompt '
                         'before this assistant turn differently from the whole chat, so '
                         'the turn cannot be located for the loss mask')
      end = text.find(self.end_token, len(prompt))
      if end < 0:
        raise ValueError(f'{where}, message {i}: no {self.end_token!r} after the assistant '
                         'turn in the rendered chat')
      spans.append((len(prompt), end + len(self.end_token)))
    ids, mask = [], []
    last = 0
    for start, stop in spans:
      for lo, hi, inside in ((last, start, False), (start, stop, True)):
        piece = self.encode(text[lo:hi]) if hi > lo else []
        ids += piece
        mask += [inside] * len(piece)
      last = stop
    tail = self.encode(text[last:]) if len(text) > last else []
    ids += tail
    mask += [False] * len(tail)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)

  def render_prompt(self, messages: Sequence[dict]) -> np.ndarray:
    """int32 [T]: the messages and the template's generation prompt."""
    return np.asarray(self.encode(self.template_text(messages, add_generation_prompt=True)),
                      np.int32)


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)
