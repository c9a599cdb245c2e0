"""The tokenizer round-trips any text and keeps chat tokens atomic."""

import pytest

from data.tokenizer import ROLES, SPECIAL_TOKENS, Tokenizer, train_tokenizer

_CORPUS = [
    "Calculate 12 + 7 * 3.",
    "<think>7 * 3 = 21\n12 + 21 = 33</think><answer>33</answer>",
    "hello there, how are you doing today?",
    "  indented line\n\twith a tab\n\n",
] * 50


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return train_tokenizer(_CORPUS, 512, str(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("text", [
    "",
    "Calculate 12 + 7 * 3.",
    "multiple   spaces    and trailing  ",
    " leading space",
    "new\nlines\n\n\nand\r\nCRLF",
    "digits 0123456789 -42 3.14159",
    "unicode not in training: héllo Ωmega 日本語 🙂 \u200b",
    "special inline <|user|>hi<|end|> text",
])
def test_exact_round_trip(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_are_single_ids(tokenizer):
  ids = [tokenizer.encode(t) for t in SPECIAL_TOKENS]
  assert all(len(i) == 1 for i in ids)
  assert len({i[0] for i in ids}) == len(SPECIAL_TOKENS)
  assert tokenizer.encode("<|end|>") == [tokenizer.end_id]
  assert [tokenizer.role_id(r) for r in ROLES] == [i[0] for i in ids[:4]]
  assert tokenizer.pad_id == 0 and tokenizer.pad_id not in sum(ids, [])
  # The limit is soft: a small corpus runs out of merges before 512.
  assert 256 + len(SPECIAL_TOKENS) < tokenizer.vocab_size <= 512


def test_digits_are_split(tokenizer):
  assert len(tokenizer.encode("12345")) == 5


def test_decode_ignores_pad(tokenizer):
  ids = tokenizer.encode("abc")
  assert tokenizer.decode([0] + ids + [0, 0]) == "abc"


def test_unknown_role_is_an_error(tokenizer):
  with pytest.raises(ValueError, match="narrator"):
    tokenizer.role_id("narrator")


def test_fingerprint_survives_save_load_and_retraining(tokenizer, tmp_path):
  tokenizer.save(str(tmp_path / "copy.model"))
  loaded = Tokenizer.load(str(tmp_path / "copy.model"))
  assert loaded.fingerprint() == tokenizer.fingerprint()
  assert loaded.encode("Calculate 1 + 2.") == tokenizer.encode("Calculate 1 + 2.")
  retrained = train_tokenizer(_CORPUS, 512, str(tmp_path / "again"))
  assert Tokenizer.load(str(tmp_path / "again")).fingerprint() == tokenizer.fingerprint()
  assert retrained.fingerprint() == tokenizer.fingerprint()
  other = train_tokenizer(_CORPUS[:4] * 10 + ["something else entirely"], 400, str(tmp_path / "b"))
  assert other.fingerprint() != tokenizer.fingerprint()


def test_too_small_vocab_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=100"):
    train_tokenizer(_CORPUS, 100, str(tmp_path))
