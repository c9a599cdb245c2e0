"""The training loop every stage shares: resume, step, log, checkpoint, preempt.

A stage supplies its jitted `step_fn(state, batch) -> (state, metrics)`, its
initial state and a resumable data iterator; this loop owns everything else so
that no stage re-implements checkpointing or logging.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from pipeline import sharding
from pipeline.checkpoint import StageCheckpointer


# Per held-out item: id, task, level, score and the completion (JSON lines).
EVAL_ITEMS_FILE = 'eval_items.jsonl'


class Preempted(Exception):
  """Raised after a SIGTERM-triggered checkpoint; main exits 0 on it."""


_PREEMPTED = {'flag': False}


def install_sigterm_handler() -> None:
  """SIGTERM (a preempted TPU VM, a scheduler) requests a checkpoint + clean exit."""
  def handler(signum, frame):
    logging.warning('SIGTERM received: checkpointing at the end of this step')
    _PREEMPTED['flag'] = True
  signal.signal(signal.SIGTERM, handler)


def preemption_requested() -> bool:
  return _PREEMPTED['flag']


@dataclasses.dataclass
class StageContext:
  """What the runner hands a stage."""
  name: str
  stage_dir: str
  mesh: Any
  rules: tuple
  tokenizer: Any
  seed: int  # this stage's seed: init, shuffling, sampling
  data_seed: int  # the run's seed: the same records and splits in every stage
  models: dict  # model name -> ModelConfig
  eval_records: list  # the run's held-out suite, the same for every stage
  init_params_path: str | None  # params to start from (previous stage or a path)
  teacher_params_path: str | None = None  # distillation: the teacher's params
  reward_model_path: str | None = None  # GRPO's preference reward: the RM's final params
  reward_model_name: str | None = None  # ... and its model (a key of models)
  is_logger: bool = True  # process 0 writes logs and summaries

  @property
  def eval_items_path(self) -> str | None:
    """Where the stage's final evaluation writes its per-item scores (process 0)."""
    return os.path.join(self.stage_dir, EVAL_ITEMS_FILE) if self.is_logger else None


class MetricsWriter:
  """absl log lines + TensorBoard events + a progress bar on a terminal."""

  def __init__(self, ctx: StageContext, total_steps: int, start_step: int):
    self.enabled = ctx.is_logger
    self.total = total_steps
    self._tb = self._bar = None
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(f'{ctx.stage_dir}/tensorboard')
    if sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, desc=ctx.name, leave=False)

  def scalars(self, step: int, metrics: dict[str, float], prefix: str = 'train') -> None:
    if not self.enabled:
      return
    for k, v in metrics.items():
      self._tb.add_scalar(f'{prefix}/{k}', v, step)
    self._tb.flush()

  def advance(self, n: int) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._bar is not None:
      self._bar.close()


def train_rows(history: list[dict]) -> list[dict]:
  """The training-step rows of a stage's history (not the held-out eval rows
  that `eval_every` interleaves)."""
  return [row for row in history if not any(k.startswith('eval/') for k in row)]


def train_loop(ctx: StageContext, *, state, step_fn: Callable, data_iter: Iterator,
               total_steps: int, checkpoint_every: int, log_every: int,
               tokens_per_step: int, batch_sharding=None,
               eval_fn: Callable[[Any], dict] | None = None,
               eval_every: int = 0) -> tuple[Any, list[dict]]:
  """Runs `step_fn` from the latest checkpoint (or step 0) to total_steps.

  Batches from `data_iter` are placed on the mesh with `batch_sharding`; with
  None they go to step_fn as they are (GRPO's batches are prompt records).
  eval_fn(state) -> metrics runs every `eval_every` steps (0 = never); its
  rows join the history with an 'eval/' prefix (for accuracy-vs-steps plots).
  Returns the final state and the logged metric rows.
  """
  ckpt = StageCheckpointer(ctx.stage_dir, checkpoint_every)
  start = ckpt.latest_step() or 0
  if start:
    state, data_state = ckpt.restore(start, state)
    data_iter.set_state(data_state)
    logging.info('%s: resumed from step %d (%s)', ctx.name, start, ckpt.directory)
  writer = MetricsWriter(ctx, total_steps, start)
  history: list[dict] = []
  t_last, steps_since = time.perf_counter(), 0
  t_start = t_last
  for step in range(start, total_steps):
    batch = next(data_iter)
    if batch_sharding is not None:
      batch = sharding.shard_batch(batch, batch_sharding)
    state, metrics = step_fn(state, batch)
    steps_since += 1
    done = step + 1
    if done % log_every == 0 or done == total_steps:
      row = {k: float(v) for k, v in sharding.to_host(metrics).items()}
      now = time.perf_counter()
      row['tokens_per_s'] = tokens_per_step * steps_since / (now - t_last)
      row['step'] = done
      eta = (now - t_start) / (done - start) * (total_steps - done)
      history.append(row)
      writer.scalars(done, row)
      if ctx.is_logger:
        logging.info('%s step %d/%d loss %.4f lr %.2e tok/s %.0f eta %.0fs', ctx.name,
                     done, total_steps, row.get('loss', np.nan), row.get('lr', np.nan),
                     row['tokens_per_s'], eta)
      writer.advance(steps_since)
      t_last, steps_since = now, 0
    if eval_fn is not None and eval_every > 0 and done % eval_every == 0:
      row = {f'eval/{k}': float(v) for k, v in eval_fn(state).items()}
      writer.scalars(done, row, prefix='heldout')
      history.append({'step': done, **row})
    ckpt.save(done, state, data_iter.get_state())
    if preemption_requested():
      ckpt.save(done, state, data_iter.get_state(), force=True)
      ckpt.wait()
      writer.close()
      raise Preempted(f'{ctx.name}: checkpointed at step {done} after SIGTERM')
  ckpt.save(total_steps, state, data_iter.get_state(), force=True)
  ckpt.wait()
  ckpt.close()
  writer.close()
  return state, history
