"""grain pipelines: shuffled, tokenised, packed training batches; eval prompts.

Each document is shifted before packing (inputs = ids[:-1], targets = ids[1:]),
so a target never belongs to another document and packing only has to place
whole (input, target, mask) triples. Batches are dicts of numpy arrays, each
[batch_size, seq_len]:

    inputs       int32    token ids
    targets      int32    next token in the same document; 0 on padding
    loss_mask    float32  1 where the target is an assistant token (render_chat)
    segment_ids  int32    1, 2, 3... per document within a row; 0 on padding
    positions    int32    position within its own document, from 0

The iterator has no worker processes, and its state (`get_state`/`set_state`)
is checkpointed with the model so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from data.chat import render_chat, render_prompt
from data.tokenizer import Tokenizer

_PACKED = ("inputs", "targets", "loss_mask")


def tokenise(record: dict, tokenizer: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """One record as shifted (inputs, targets, loss_mask), at most seq_len long."""
  ids, mask = render_chat(record["messages"], tokenizer, record_id=record.get("id"))
  # seq_len + 1 tokens give seq_len (input, target) pairs; the rest is dropped.
  ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
  return {
      "inputs": ids[:-1],
      "targets": ids[1:],
      # The mask belongs to the predicted token, hence the shift.
      "loss_mask": mask[1:].astype(np.float32),
  }


def _rename(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # The packer gives segment ids and positions per feature; all three features
  # were packed together, so the ones for `inputs` serve for all.
  return {
      "inputs": packed["inputs"],
      "targets": packed["targets"],
      "loss_mask": packed["loss_mask"],
      "segment_ids": packed["inputs_segment_ids"],
      "positions": packed["inputs_positions"],
  }


def check_batch_args(seq_len: int, batch_size: int, shard_index: int, shard_count: int) -> None:
  """Raises ValueError for a batch shape or process shard that cannot work."""
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}.")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count}).")


def pack_and_batch(
    documents: grain.IterDataset, *, seq_len: int, batch_size: int
) -> grain.IterDataset:
  """Packs tokenised documents (`tokenise`) into batches of [B, T] rows.

  One packing round fills exactly one batch, so batch k holds the documents
  read while packing round k, except that each round starts with the document
  that did not fit into the previous one (the packer reads one ahead).
  """
  packed = grain.experimental.FirstFitPackIterDataset(
      documents,
      length_struct={k: seq_len for k in _PACKED},
      num_packing_bins=batch_size,
      shuffle_bins=False,
  )
  return packed.map(_rename).batch(batch_size, drop_remainder=True)


def make_train_iterator(
    records: Sequence[dict],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
  """Builds an endless, deterministic, resumable iterator of packed batches.

  Args:
    records: chat records ({"messages": [...], "id": ...}).
    tokenizer: the tokenizer for `render_chat`.
    seq_len: tokens per row (T).
    batch_size: rows per batch on this process (B).
    seed: shuffle seed; each epoch is reshuffled from it.
    shard_index: this process's shard; it reads records[shard_index::shard_count].
    shard_count: number of processes sharing the records.

  Returns:
    A grain DatasetIterator of dicts of [B, T] arrays (see module docstring).
  """
  check_batch_args(seq_len, batch_size, shard_index, shard_count)
  if len(records) < shard_count:
    raise ValueError(f"{len(records)} records cannot fill {shard_count} shards.")
  documents = (
      grain.MapDataset.source(records)[shard_index::shard_count]
      .shuffle(seed=seed)
      .repeat(None)  # reseeds the shuffle every epoch
      .map(lambda r: tokenise(r, tokenizer, seq_len))
      .to_iter_dataset()
  )
  return iter(pack_and_batch(documents, seq_len=seq_len, batch_size=batch_size))


def make_eval_prompts(records: Sequence[dict], tokenizer: Tokenizer) -> list[np.ndarray]:
  """Prompt ids for each record: every message but the last, then `<|assistant|>`."""
  return [render_prompt(r["messages"][:-1], tokenizer) for r in records]
