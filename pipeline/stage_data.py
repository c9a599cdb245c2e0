"""From a stage's `data` config to records, training batches and scorers.

A stage's data config names its sources with mixture weights, e.g.

    data.sources.math = dict(kind='reasoning_gym', weight=0.5, train_size=2000,
                             eval_size=50, options=dict(task_names=('basic_arithmetic',)))
    data.sources.code = dict(kind='code_tasks', weight=0.2, train_size=1000,
                             eval_size=40, options=dict(levels=(0, 1)))

`options` are passed to the source module's `make_records`. Every source
yields the common record format `{"id", "messages", "task", ...}`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Callable

import jax
import ml_collections
import numpy as np

from data.sources import agent, chat, code_tasks, humaneval, reasoning_gym_math, tool_tasks


@dataclasses.dataclass(frozen=True)
class SourceKind:
  make_records: Callable  # (split, size, seed, **options) -> list[dict]


def _reasoning_gym(split, size, seed, task_names=reasoning_gym_math.DEFAULT_TASKS,
                   **options):
  return reasoning_gym_math.make_records(tuple(task_names), split, size, seed, **options)


SOURCE_KINDS = {
    'reasoning_gym': SourceKind(_reasoning_gym),
    'code_tasks': SourceKind(code_tasks.make_records),
    'humaneval': SourceKind(humaneval.make_records),
    'chat': SourceKind(chat.make_records),
    'agent': SourceKind(agent.make_records),
    'tool_use': SourceKind(tool_tasks.make_records),
}


@dataclasses.dataclass
class StageData:
  train: dict[str, list[dict]]  # source name -> training records
  eval: list[dict]  # held-out records of all sources

  def all_train(self) -> list[dict]:
    return [r for records in self.train.values() for r in records]


def eval_input(record: dict) -> list[dict]:
  """The messages a model sees when evaluated on the record: everything before
  the first assistant turn (chat is scored on the whole conversation)."""
  if record['task'] == 'chat':
    return record['messages']
  for i, message in enumerate(record['messages']):
    if message['role'] == 'assistant':
      return record['messages'][:i]
  return record['messages']


def generation_prompt(record: dict) -> list[dict]:
  """The messages a policy answers: as eval_input, except that a chat ends
  before its final assistant turn (the turn the policy writes)."""
  if record['task'] == 'chat':
    last = max(i for i, m in enumerate(record['messages']) if m['role'] == 'assistant')
    return record['messages'][:last]
  return eval_input(record)


def check_no_leak(train: list[dict], eval_: list[dict]) -> None:
  """Raises if any evaluation input appears verbatim among the training records.

  Compares what the model is evaluated on (the prompt, or the whole chat) with
  the same part of every training record, across all sources.
  """
  key = lambda r: json.dumps(eval_input(r), sort_keys=True)
  seen = {key(r) for r in train}
  leaked = [r['id'] for r in eval_ if key(r) in seen]
  if leaked:
    raise ValueError(f'{len(leaked)} evaluation items also appear in training, e.g. '
                     f'{leaked[:5]}; the sources must split disjointly')


def load(data_cfg, *, seed: int) -> StageData:
  """Train and held-out records of every source; eval never overlaps train.

  Cached: the runner and the stage ask for the same data.
  """
  return _load(data_cfg.to_json(sort_keys=True), seed)


@functools.lru_cache(maxsize=8)
def _load(data_json: str, seed: int) -> StageData:
  data_cfg = ml_collections.ConfigDict(json.loads(data_json))
  train, eval_ = {}, []
  for name, src in data_cfg.sources.items():
    if src.kind not in SOURCE_KINDS:
      raise ValueError(f'data.sources.{name}.kind={src.kind!r} is unknown; valid kinds: '
                       f'{sorted(SOURCE_KINDS)}')
    make = SOURCE_KINDS[src.kind].make_records
    options = src.options.to_dict()
    try:
      train[name] = make('train', src.train_size, seed, **options)
      eval_ += make('eval', src.eval_size, seed, **options) if src.eval_size else []
    except TypeError as e:
      raise ValueError(f'data.sources.{name}.options={options} do not fit source kind '
                       f'{src.kind!r}: {e}') from e
  check_no_leak([r for records in train.values() for r in records], eval_)
  return StageData(train, eval_)


class ShardsIterator:
  """Concatenates the batches of consecutive data shards along the rows.

  A process hosting shards [i, j) yields rows [i, j) * B/S of every global
  batch, so the global batch is the same whatever the number of processes.
  """

  def __init__(self, shards: list):
    self.shards = shards

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(s) for s in self.shards]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict:
    return {'shards': [s.get_state() for s in self.shards]}

  def set_state(self, state: dict) -> None:
    if len(state['shards']) != len(self.shards):
      raise ValueError(f'data state holds {len(state["shards"])} shards, this process hosts '
                       f'{len(self.shards)}')
    for s, st in zip(self.shards, state['shards']):
      s.set_state(st)


def hosted_shards(num_shards: int, batch_size: int) -> range:
  """The data shards this process loads: an equal, contiguous share of S."""
  processes = jax.process_count()
  num_shards = num_shards or processes
  if num_shards % processes or batch_size % num_shards:
    raise ValueError(f'data.shards={num_shards} must be a multiple of the {processes} '
                     f'processes and divide batch_size={batch_size}')
  per_process = num_shards // processes
  return range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


def train_iterator(data: StageData, tokenizer, stage_cfg, *, seed: int):
  """This process's share of the stage's packed training batches: sources mixed
  by their weights, difficulty levels unlocked by the stage's curriculum.

  The global batch is `data.shards` slices (S; 0 = one per process), slice k
  packed from shard k of every source's records; this process loads only the
  slices it hosts (`hosted_shards`).
  """
  from data import mixture
  weights = {name: src.weight for name, src in stage_cfg.data.sources.items()}
  num_shards = stage_cfg.data.shards or jax.process_count()
  shards = [mixture.make_mixture_iterator(
      data.train, weights, tokenizer, seq_len=stage_cfg.seq_len,
      batch_size=stage_cfg.batch_size // num_shards, seed=seed,
      total_steps=stage_cfg.steps, curriculum=tuple(map(tuple, stage_cfg.data.curriculum)),
      shard_index=k, shard_count=num_shards)
      for k in hosted_shards(num_shards, stage_cfg.batch_size)]
  return shards[0] if len(shards) == 1 else ShardsIterator(shards)
