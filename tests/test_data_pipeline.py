"""Packed training batches: layout, document boundaries, determinism, resume."""

import json

import numpy as np
import pytest

from data.chat import render_chat
from data.pipeline import make_eval_prompts, make_train_iterator
from data.tokenizer import train_tokenizer

SEQ_LEN, BATCH = 48, 4


def _record(i, words):
  return {"id": f"r{i}", "messages": [
      {"role": "user", "content": f"question {i}: " + "ab " * words},
      {"role": "assistant", "content": f"answer {i}"},
  ]}


# Distinct documents of varied length, plus one longer than a row.
RECORDS = [_record(i, i % 13) for i in range(120)] + [_record(999, 60)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = [m["content"] for r in RECORDS for m in r["messages"]]
  return train_tokenizer(texts, 300, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def rendered(tokenizer):
  """Maps each document's (truncated) ids to (record id, loss mask)."""
  out = {}
  for r in RECORDS:
    ids, mask = render_chat(r["messages"], tokenizer)
    out[tuple(ids[: SEQ_LEN + 1])] = (r["id"], mask[: SEQ_LEN + 1])
  return out


def _iterator(tokenizer, seed=0, **kwargs):
  return make_train_iterator(
      RECORDS, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, seed=seed, **kwargs)


def _documents(batch):
  """Yields (ids, inputs, targets, loss_mask, positions) per packed document."""
  for row in range(BATCH):
    seg = batch["segment_ids"][row]
    for s in np.unique(seg[seg > 0]):
      where = seg == s
      inputs, targets = batch["inputs"][row][where], batch["targets"][row][where]
      ids = tuple(np.concatenate([inputs[:1], targets]))
      yield ids, inputs, targets, batch["loss_mask"][row][where], batch["positions"][row][where]


def test_shapes_and_dtypes(tokenizer):
  batch = next(_iterator(tokenizer))
  dtypes = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32,
            "segment_ids": np.int32, "positions": np.int32}
  assert set(batch) == set(dtypes)
  for key, dtype in dtypes.items():
    assert batch[key].shape == (BATCH, SEQ_LEN) and batch[key].dtype == dtype, key


def test_documents_segments_positions_and_masks(tokenizer, rendered):
  it, seen = _iterator(tokenizer), set()
  for _ in range(20):
    batch = next(it)
    pad = batch["segment_ids"] == 0
    for key in ("inputs", "targets", "loss_mask", "positions"):
      assert not batch[key][pad].any(), key
    for seg in batch["segment_ids"]:
      # Segments are 1, 2, 3... in contiguous runs, padding only at the end.
      used = seg[seg > 0]
      assert (np.diff(used) >= 0).all() and set(used) == set(range(1, used.max() + 1))
      assert (seg[len(used):] == 0).all()
    for ids, inputs, targets, loss_mask, positions in _documents(batch):
      np.testing.assert_array_equal(positions, np.arange(len(inputs)))
      # Every packed document is one whole rendered record, so no target comes
      # from a neighbouring document.
      np.testing.assert_array_equal(inputs[1:], targets[:-1])
      assert ids in rendered, "packed document is not a record"
      record_id, mask = rendered[ids]
      np.testing.assert_array_equal(loss_mask, mask[1:].astype(np.float32))
      seen.add(record_id)
  assert "r999" in seen, "the over-long record should appear, truncated"
  assert len(seen) > 60


def test_loss_mask_marks_assistant_targets(tokenizer):
  batch = next(_iterator(tokenizer))
  on = batch["targets"][batch["loss_mask"] == 1]
  assert tokenizer.end_id in on
  assert tokenizer.role_id("user") not in on and tokenizer.role_id("assistant") not in on
  # Each document's last target is the assistant's end token.
  for _, _, targets, loss_mask, _ in _documents(batch):
    assert targets[-1] == tokenizer.end_id and loss_mask[-1] == 1
    assert "answer" in tokenizer.decode(targets[loss_mask == 1])


def test_deterministic_for_a_seed(tokenizer):
  a, b, c = _iterator(tokenizer), _iterator(tokenizer), _iterator(tokenizer, seed=1)
  first_a = [next(a) for _ in range(5)]
  for x, y in zip(first_a, [next(b) for _ in range(5)]):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(first_a[0]["inputs"], next(c)["inputs"])


def test_resume_from_state(tokenizer):
  it = _iterator(tokenizer)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(2)]
  fresh = _iterator(tokenizer)
  fresh.set_state(state)
  for x, y in zip(expected, [next(fresh) for _ in range(2)]):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_shards_are_disjoint(tokenizer, rendered):
  owners = []
  for index in range(2):
    it = _iterator(tokenizer, shard_index=index, shard_count=2)
    owners.append({rendered[doc[0]][0] for _ in range(10) for doc in _documents(next(it))})
  assert owners[0] and owners[1] and not owners[0] & owners[1]


def test_bad_shard_is_an_error(tokenizer):
  with pytest.raises(ValueError, match="shard_index=2"):
    _iterator(tokenizer, shard_index=2, shard_count=2)


def test_eval_prompts_end_with_assistant_header(tokenizer):
  prompts = make_eval_prompts(RECORDS[:3], tokenizer)
  assert len(prompts) == 3
  for record, prompt in zip(RECORDS, prompts):
    assert prompt[-1] == tokenizer.role_id("assistant")
    assert tokenizer.decode(prompt) == (
        f"<|user|>{record['messages'][0]['content']}<|end|><|assistant|>")
