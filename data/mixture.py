"""Weighted data mixtures with a difficulty curriculum, packed like `data.pipeline`.

Each pool is one named source's training records. Every record is drawn in
two steps: a pool, with probability proportional to its weight, then a record
of that pool, uniformly among its records whose `level` (difficulty, an int;
missing = 0) the curriculum allows at that point of training. Records of one
(pool, level) group come in a shuffled order that is reshuffled every epoch of
that group, so a small group repeats while a large one is still in its first
pass. Drawn records are tokenised and packed by `data.pipeline`, so batches
have exactly the format of `make_train_iterator` (dicts of [B, T] arrays).

Curriculum. `curriculum` is a list of (fraction, max_level) pairs, e.g.
((0.0, 0), (0.3, 1), (0.6, 2)). At progress p = batches emitted / total_steps
the allowed levels are those <= the max_level of the last pair whose fraction
is <= p; no curriculum allows every level throughout. A pool with no record at
an allowed level gives records of its lowest level instead, so a source
without easy items never stalls the mixture.

Progress is exact. The packer reads one record ahead: the record that
overflows batch k is drawn while batch k is being packed and becomes the
first record of batch k + 1. So the phase is tied to draws, not guessed: when
batch k is emitted and the phase changes, the iterator notes the index of the
next draw, and every draw from that index on uses the new phase. Batch k thus
holds records drawn under the phase of progress k / total_steps, plus at most
one (its first) drawn under the phase of batch k - 1; because max_level never
decreases, every record of batch k is within the levels its phase allows.
The noted phase starts live in the iterator state, so a restored iterator
redraws the read-ahead record under the phase it had the first time.

State (JSON-serialisable, from `get_state()`):

    {"batches": int,                 # batches emitted (progress numerator)
     "phases": [[first_draw, max_level or None], ...],
     "pools": {name: records in this process's shard},  # checked on restore
     "pipeline": grain state of the packer, which nests the source state
                 {"draws": int, "taken": {pool: {level: int}}}}

Randomness is counter-based: draw i uses a generator seeded by (seed,
shard_index, i), and group orders are seeded by (seed, pool, level, epoch), so
the counters above are all a resume needs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from data import pipeline
from data.tokenizer import Tokenizer

# Leading words of the seed sequences keep the two random streams apart.
_DRAW_STREAM, _ORDER_STREAM = 1, 2


@dataclasses.dataclass
class _Progress:
  """What the source and the batch iterator share.

  The source keeps `draws` and `taken` current; the batch iterator appends to
  `phases` when a batch moves training into a new curriculum phase.
  """
  draws: int  # records drawn so far
  taken: dict[str, dict[int, int]]  # pool -> level -> records drawn
  phases: list[list]  # [first draw index, max level or None], by draw index

  def max_level(self, draw: int) -> int | None:
    level = self.phases[0][1]
    for first_draw, max_level in self.phases:
      if first_draw <= draw:
        level = max_level
    return level


class _MixtureSource(grain.IterDataset):
  """An endless stream of records drawn from the pools (see module docstring).

  Iterated once: its iterator keeps its counters in the shared `_Progress`.
  """

  def __init__(self, groups, weights, *, seed: int, shard_index: int, progress: _Progress):
    super().__init__()
    self._groups, self._weights = groups, weights
    self._seed, self._shard_index, self._progress = seed, shard_index, progress

  def __iter__(self) -> grain.DatasetIterator:
    return _MixtureSourceIterator(
        self._groups, self._weights, seed=self._seed, shard_index=self._shard_index,
        progress=self._progress)


class _MixtureSourceIterator(grain.DatasetIterator):
  """Draw i: a pool by weight, then an allowed record of it (module docstring)."""

  def __init__(self, groups, weights, *, seed: int, shard_index: int, progress: _Progress):
    super().__init__()
    self._groups = groups  # pool -> {level: [records]}, levels ascending
    self._names = sorted(weights)  # positive-weight pools, in a fixed order
    cumulative = np.cumsum([weights[name] for name in self._names])
    self._cumulative = cumulative / cumulative[-1]
    self._seed, self._shard_index, self._progress = seed, shard_index, progress
    self._orders: dict[tuple[str, int], tuple[int, np.ndarray]] = {}

  def _order(self, pool: str, level: int, epoch: int) -> np.ndarray:
    """The shuffled order of group (pool, level) in `epoch`; cached per group."""
    cached = self._orders.get((pool, level))
    if cached is None or cached[0] != epoch:
      rng = np.random.default_rng(
          [_ORDER_STREAM, self._seed, zlib.crc32(pool.encode()), level, epoch])
      cached = (epoch, rng.permutation(len(self._groups[pool][level])))
      self._orders[(pool, level)] = cached
    return cached[1]

  def __next__(self) -> dict:
    progress, draw = self._progress, self._progress.draws
    u_pool, u_level = np.random.default_rng(
        [_DRAW_STREAM, self._seed, self._shard_index, draw]).random(2)
    index = int(np.searchsorted(self._cumulative, u_pool, side="right"))
    pool = self._names[min(index, len(self._names) - 1)]
    groups = self._groups[pool]
    max_level = progress.max_level(draw)
    allowed = [lv for lv in groups if max_level is None or lv <= max_level]
    # A pool whose easiest records are above the allowed levels gives its
    # easiest ones rather than nothing, so the mixture never waits on it.
    allowed = allowed or [min(groups)]
    # Uniform over the allowed records: pick a level in proportion to its size.
    sizes = np.cumsum([len(groups[lv]) for lv in allowed])
    pick = int(np.searchsorted(sizes, u_level * sizes[-1], side="right"))
    level = allowed[min(pick, len(allowed) - 1)]
    epoch, position = divmod(progress.taken[pool][level], len(groups[level]))
    record = groups[level][self._order(pool, level, epoch)[position]]
    progress.taken[pool][level] += 1
    progress.draws += 1
    return record

  def get_state(self) -> dict[str, Any]:
    taken = {pool: {str(lv): n for lv, n in levels.items()}
             for pool, levels in self._progress.taken.items()}
    return {"draws": self._progress.draws, "taken": taken}

  def set_state(self, state: dict[str, Any]) -> None:
    taken = {pool: {int(lv): n for lv, n in levels.items()}
             for pool, levels in state["taken"].items()}
    have = {pool: sorted(levels) for pool, levels in taken.items()}
    want = {pool: sorted(levels) for pool, levels in self._progress.taken.items()}
    if have != want:
      raise ValueError(
          f"Mixture state has levels {have} per pool, this mixture has {want}; resume"
          " with the same data and weights.")
    self._progress.draws = state["draws"]
    self._progress.taken = taken


class MixtureIterator(grain.DatasetIterator):
  """Packed batches of a weighted, curriculum-gated mixture (module docstring)."""

  def __init__(self, batches: grain.DatasetIterator, progress: _Progress, *,
               curriculum: Sequence[tuple[float, int]], total_steps: int,
               pool_sizes: dict[str, int]):
    super().__init__(batches)
    self._progress = progress
    self._curriculum, self._total_steps = curriculum, total_steps
    self._pool_sizes = pool_sizes
    self._batches = 0

  def max_level(self, batches: int | None = None) -> int | None:
    """The highest level allowed after `batches` batches (now by default); None = all."""
    batches = self._batches if batches is None else batches
    level = None
    for fraction, max_level in self._curriculum:
      # Compare p itself, so that e.g. 3 / 10 meets the fraction 0.3 exactly.
      if fraction <= batches / self._total_steps:
        level = max_level
    return level

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    self._batches += 1
    level = self.max_level()
    if level != self._progress.phases[-1][1]:
      # The packer has read the record that starts the next batch already; the
      # new phase applies from the draw after it (see the module docstring).
      self._progress.phases.append([self._progress.draws, level])
    return batch

  def mixture_stats(self) -> dict[str, Any]:
    """Records drawn so far (the emitted batches plus the one read ahead).

    Returns:
      {"records": total, "fraction": {pool: share of records},
       "levels": {pool: {level: records}}, "max_level": allowed now (None = all)}.
    """
    taken = self._progress.taken
    total = max(self._progress.draws, 1)
    return {
        "records": self._progress.draws,
        "fraction": {pool: sum(levels.values()) / total for pool, levels in taken.items()},
        "levels": copy.deepcopy(taken),
        "max_level": self.max_level(),
    }

  def get_state(self) -> dict[str, Any]:
    return {
        "batches": self._batches,
        "phases": copy.deepcopy(self._progress.phases),
        "pools": dict(self._pool_sizes),
        "pipeline": self._parent.get_state(),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or set(state) != {"batches", "phases", "pools", "pipeline"}:
      raise ValueError(
          f"Not a mixture iterator state: {str(state):.80}; was it written by"
          " data.pipeline.make_train_iterator?")
    if state["pools"] != self._pool_sizes:
      raise ValueError(
          f"Mixture state was written for pools (records per shard) {state['pools']}, this"
          f" mixture has {self._pool_sizes}; resume with the same data and weights.")
    self._parent.set_state(state["pipeline"])
    self._progress.phases = [list(phase) for phase in state["phases"]]
    self._batches = state["batches"]


def _check_weights(pools: Mapping[str, Sequence[dict]], weights: Mapping[str, float]) -> None:
  unknown = sorted(set(weights) - set(pools))
  if unknown:
    raise ValueError(f"weights name pools that do not exist: {unknown}; pools are {sorted(pools)}.")
  missing = sorted(set(pools) - set(weights))
  if missing:
    raise ValueError(f"pools {missing} have no weight; give each pool a weight (0 to skip it).")
  for name, weight in weights.items():
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
      raise ValueError(f"weights[{name!r}]={weight!r} must be a finite number >= 0.")
  if not any(weight > 0 for weight in weights.values()):
    raise ValueError(f"weights {dict(weights)} are all zero; at least one pool needs weight > 0.")


def _check_curriculum(curriculum: Sequence[tuple[float, int]]) -> list[tuple[float, int]]:
  checked = []
  for i, pair in enumerate(curriculum):
    if len(pair) != 2:
      raise ValueError(f"curriculum[{i}]={pair!r} must be a (fraction, max_level) pair.")
    fraction, max_level = pair
    if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
      raise ValueError(f"curriculum[{i}] fraction {fraction!r} must be in [0, 1].")
    if isinstance(max_level, bool) or not isinstance(max_level, int) or max_level < 0:
      raise ValueError(f"curriculum[{i}] max_level {max_level!r} must be an int >= 0.")
    if checked and fraction <= checked[-1][0]:
      raise ValueError(
          f"curriculum fractions must increase strictly; curriculum[{i}]={pair!r} follows"
          f" {checked[-1]}.")
    # Levels only rise: batch k may start with one record drawn under the phase
    # of batch k - 1, which is then still allowed.
    if checked and max_level < checked[-1][1]:
      raise ValueError(
          f"curriculum max_level must not decrease; curriculum[{i}]={pair!r} follows"
          f" {checked[-1]}.")
    checked.append((float(fraction), max_level))
  if checked and checked[0][0] != 0:
    raise ValueError(
        f"curriculum must start at fraction 0.0 (what is allowed before {checked[0]}?),"
        f" got {list(curriculum)}.")
  return checked


def _group_by_level(name: str, records: Sequence[dict]) -> dict[int, list[dict]]:
  groups: dict[int, list[dict]] = {}
  for record in records:
    level = record.get("level", 0)
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0:
      raise ValueError(
          f"pools[{name!r}] record {record.get('id')!r}: level must be an int >= 0,"
          f" got {level!r}.")
    groups.setdefault(int(level), []).append(record)
  return dict(sorted(groups.items()))


def make_mixture_iterator(
    pools: Mapping[str, Sequence[dict]],
    weights: Mapping[str, float],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    total_steps: int,
    curriculum: Sequence[tuple[float, int]] = (),
    shard_index: int = 0,
    shard_count: int = 1,
) -> MixtureIterator:
  """Builds an endless, deterministic, resumable iterator over a data mixture.

  Args:
    pools: source name -> training records (chat records; optional int `level`).
    weights: source name -> mixture weight (any scale; 0 leaves a pool out).
      Every pool needs a weight and every weight a pool.
    tokenizer: the tokenizer for `render_chat`.
    seq_len: tokens per row (T).
    batch_size: rows per batch on this process (B).
    seed: seed of the pool draws and of each group's per-epoch shuffles.
    total_steps: batches in the stage; progress p = batches emitted / total_steps.
    curriculum: (fraction, max_level) pairs, fractions increasing from 0.0 and
      levels never decreasing; empty allows all levels throughout.
    shard_index: this process's shard; it reads pool[shard_index::shard_count]
      of every pool, so processes never draw the same record.
    shard_count: number of processes sharing the pools.

  Returns:
    A MixtureIterator of dicts of [B, T] arrays, the format of
    `data.pipeline.make_train_iterator`; `mixture_stats()` reports the
    realised mix.
  """
  pipeline.check_batch_args(seq_len, batch_size, shard_index, shard_count)
  if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
    raise ValueError(f"total_steps={total_steps!r} must be an int >= 1.")
  _check_weights(pools, weights)
  curriculum = _check_curriculum(curriculum)
  groups, used_weights = {}, {}
  for name in sorted(pools):
    if weights[name] == 0:
      continue
    shard = list(pools[name])[shard_index::shard_count]
    if not shard:
      raise ValueError(
          f"pools[{name!r}] has {len(pools[name])} records, too few for {shard_count} shards;"
          " add records or set its weight to 0.")
    groups[name] = _group_by_level(name, shard)
    used_weights[name] = float(weights[name])
  progress = _Progress(
      draws=0,
      taken={name: {level: 0 for level in levels} for name, levels in groups.items()},
      phases=[[0, curriculum[0][1] if curriculum else None]],
  )
  source = _MixtureSource(groups, used_weights, seed=seed, shard_index=shard_index,
                          progress=progress)
  documents = source.map(lambda r: pipeline.tokenise(r, tokenizer, seq_len))
  batches = iter(pipeline.pack_and_batch(documents, seq_len=seq_len, batch_size=batch_size))
  return MixtureIterator(
      batches, progress, curriculum=curriculum, total_steps=total_steps,
      pool_sizes={name: sum(map(len, levels.values())) for name, levels in groups.items()})
