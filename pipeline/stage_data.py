"""From a stage's `data` config to records, batches and scorers.

A stage's data config names its sources, e.g.

    data.sources.math = dict(kind='reasoning_gym', weight=1.0,
                             tasks=('basic_arithmetic',), train_size=2000, eval_size=50)
"""

from __future__ import annotations

import dataclasses

from data import pipeline as data_pipeline
from data.sources import reasoning_gym_math

SOURCE_KINDS = ('reasoning_gym',)


@dataclasses.dataclass
class StageData:
  train: list[dict]
  eval: list[dict]


def _source_records(src, split: str, seed: int) -> list[dict]:
  if src.kind == 'reasoning_gym':
    size = src.train_size if split == 'train' else src.eval_size
    return reasoning_gym_math.make_records(tuple(src.tasks), split, size, seed,
                                           task_kwargs=src.task_kwargs.to_dict())
  raise ValueError(f'data source kind {src.kind!r} is unknown; valid kinds: {SOURCE_KINDS}')


def load(data_cfg, tokenizer=None, *, seed: int) -> StageData:
  """Train and held-out records of every source; eval never overlaps train."""
  train, eval_ = [], []
  for name, src in data_cfg.sources.items():
    if src.kind not in SOURCE_KINDS:
      raise ValueError(f'data.sources.{name}.kind={src.kind!r} is unknown; '
                       f'valid kinds: {SOURCE_KINDS}')
    eval_part = _source_records(src, 'eval', seed)
    train_part = _source_records(src, 'train', seed)
    reasoning_gym_math.check_disjoint(train_part, eval_part)
    train += train_part
    eval_ += eval_part
  return StageData(train, eval_)


def train_iterator(records, tokenizer, stage_cfg, *, seed: int):
  """This process's share of the stage's packed training batches."""
  import jax
  return data_pipeline.make_train_iterator(
      records, tokenizer, seq_len=stage_cfg.seq_len,
      batch_size=stage_cfg.batch_size // jax.process_count(), seed=seed,
      shard_index=jax.process_index(), shard_count=jax.process_count())


def score(record: dict, completion: str) -> float:
  """The task's own scorer on a completion."""
  return reasoning_gym_math.score(record, completion)


def corpus_texts(data_cfg, *, seed: int) -> list[str]:
  """Every message text of the training records (to train the tokenizer on)."""
  texts = []
  for record in load(data_cfg, seed=seed).train:
    texts += [m['content'] for m in record['messages']]
  return texts
