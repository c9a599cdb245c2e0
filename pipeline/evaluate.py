"""Held-out evaluation: generate answers greedily and score them."""

from __future__ import annotations

import collections
from typing import Callable, Sequence

import jax
import numpy as np

from data.chat import render_prompt
from pipeline import sampling
from pipeline import state as state_lib


def generate_answers(spec: state_lib.ModelSpec, params, tokenizer, records: Sequence[dict],
                     *, max_new_tokens: int, batch_size: int, seed: int = 0) -> list[str]:
  """Greedy completions (decoded text, end token stripped) for each record's prompt:
  every message except the final assistant turn."""
  prompts = [render_prompt(r['messages'][:-1], tokenizer) for r in records]
  samples = sampling.generate(
      spec, params, prompts, sampling.SamplingConfig(max_new_tokens=max_new_tokens),
      rng=jax.random.key(seed), end_id=tokenizer.end_id, pad_id=tokenizer.pad_id,
      batch_size=batch_size)
  return [tokenizer.decode([t for t in row[:n] if t != tokenizer.end_id])
          for row, n in zip(samples.tokens.tolist(), samples.lengths)]


def accuracy_by_task(records: Sequence[dict], completions: Sequence[str],
                     score: Callable[[dict, str], float]) -> dict[str, float]:
  """Mean score per task ('accuracy/<task>') and over all records ('accuracy')."""
  per_task = collections.defaultdict(list)
  for record, completion in zip(records, completions):
    per_task[record['task']].append(score(record, completion))
  metrics = {f'accuracy/{task}': float(np.mean(s)) for task, s in sorted(per_task.items())}
  metrics['accuracy'] = float(np.mean([s for v in per_task.values() for s in v]))
  metrics['num_eval'] = len(records)
  return metrics


def evaluate(spec: state_lib.ModelSpec, params, tokenizer, records: Sequence[dict], cfg,
             *, seed: int = 0) -> dict[str, float]:
  """Held-out metrics of one model on a stage's eval records.

  cfg: the stage's `eval` config (max_new_tokens, batch_size).
  """
  from pipeline import stage_data  # stage_data imports this module's users
  completions = generate_answers(spec, params, tokenizer, records,
                                 max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.batch_size, seed=seed)
  return accuracy_by_task(records, completions, stage_data.score)
