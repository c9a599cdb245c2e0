"""A sentencepiece tokenizer trained on our own corpora, with chat special tokens.

The model must round-trip any string exactly (identity normalisation, byte
fallback, no dummy prefix, whitespace kept), because rewards are computed on
decoded text and a tokenizer that rewrites spaces would silently change answers.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm

# Role headers and end of turn. They are sentencepiece user_defined_symbols, so
# these strings always encode to one id each, even inside running text.
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>")
ROLES = ("system", "user", "assistant", "tool")
PAD_ID = 0
_UNK_ID = 1
MODEL_FILENAME = "tokenizer.model"


class Tokenizer:
  """A loaded sentencepiece model plus the ids the chat template needs."""

  def __init__(self, model_proto: bytes, *, source: str = "<bytes>"):
    """Wraps a serialised sentencepiece ModelProto.

    Args:
      model_proto: the bytes of a `tokenizer.model` file.
      source: where the bytes came from, used in error messages.
    """
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    if self._sp.pad_id() != PAD_ID:
      raise ValueError(
          f"Tokenizer {source}: pad id is {self._sp.pad_id()}, expected {PAD_ID}."
          " Retrain it with data.tokenizer.train_tokenizer."
      )
    self._special_ids = {}
    for token in SPECIAL_TOKENS:
      ids = self._sp.encode(token)
      if len(ids) != 1:
        raise ValueError(
            f"Tokenizer {source}: special token {token!r} encodes to {ids}, not"
            " one id. It was not trained with data.tokenizer.train_tokenizer."
        )
      self._special_ids[token] = ids[0]

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    """Loads `path`, a `tokenizer.model` file or a folder holding one."""
    if os.path.isdir(path):
      path = os.path.join(path, MODEL_FILENAME)
    with open(path, "rb") as f:
      return cls(f.read(), source=path)

  def save(self, path: str) -> None:
    """Writes the model proto to `path` (a file, or a folder to hold one)."""
    if os.path.isdir(path):
      path = os.path.join(path, MODEL_FILENAME)
    with open(path, "wb") as f:
      f.write(self._proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def end_id(self) -> int:
    """Id of `<|end|>`, which ends every turn and is the end of sequence."""
    return self._special_ids["<|end|>"]

  def role_id(self, role: str) -> int:
    """Id of the header token for `role` ('system'|'user'|'assistant'|'tool')."""
    if role not in ROLES:
      raise ValueError(f"Unknown chat role {role!r}; expected one of {ROLES}.")
    return self._special_ids[f"<|{role}|>"]

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes ids to text, dropping padding."""
    return self._sp.decode([int(i) for i in ids if int(i) != PAD_ID])

  def fingerprint(self) -> str:
    """A stable hash of the model, to check two models share a tokenizer."""
    return hashlib.sha256(self._proto).hexdigest()[:16]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> Tokenizer:
  """Trains a byte-fallback BPE model and writes `out_dir/tokenizer.model`.

  Args:
    texts: training sentences (whole documents are fine; newlines are kept).
    vocab_size: target vocabulary size, including the 256 byte pieces and the
      special tokens. On a small corpus the trainer may stop below it (the
      limit is soft); read the real size from `Tokenizer.vocab_size`.
    out_dir: folder for `tokenizer.model`; created if missing.

  Returns:
    The trained tokenizer.
  """
  # Byte pieces, specials, pad and unk are all fixed entries of the vocab.
  min_size = 256 + len(SPECIAL_TOKENS) + 2 + 1
  if vocab_size < min_size:
    raise ValueError(
        f"vocab_size={vocab_size} is too small: the 256 byte pieces, the"
        f" {len(SPECIAL_TOKENS)} special tokens, pad and unk already take"
        f" {min_size - 1} ids; use at least {min_size}."
    )
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("train_tokenizer got no non-empty texts to train on.")
  # Determinism: one thread, no sentence sampling or shuffling, fixed RNG seed.
  spm.set_random_generator_seed(0)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      normalization_rule_name="identity",
      byte_fallback=True,
      split_digits=True,
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      character_coverage=1.0,
      user_defined_symbols=list(SPECIAL_TOKENS),
      pad_id=PAD_ID,
      unk_id=_UNK_ID,
      bos_id=-1,
      eos_id=-1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      max_sentence_length=1 << 16,
      num_threads=1,
      minloglevel=2,
  )
  os.makedirs(out_dir, exist_ok=True)
  tokenizer = Tokenizer(model.getvalue(), source=out_dir)
  tokenizer.save(os.path.join(out_dir, MODEL_FILENAME))
  return tokenizer
