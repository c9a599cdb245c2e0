"""Optimizer and learning-rate schedules from a stage's `optim` config."""

from __future__ import annotations

import jax
import optax


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warm-up, then `cosine` decay or warmup-stable-decay (`wsd`).

  cfg fields: lr, warmup_steps, schedule ('cosine' | 'wsd' | 'constant'),
  min_lr_ratio (final lr / peak lr), decay_fraction (wsd: share of the steps
  spent in the final linear decay).
  """
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
  ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
  rest = max(total_steps - warmup, 1)
  if cfg.schedule == 'cosine':
    tail = optax.cosine_decay_schedule(peak, rest, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == 'wsd':
    decay = max(int(rest * cfg.decay_fraction), 1)
    tail = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
        [rest - decay])
  elif cfg.schedule == 'constant':
    tail = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optim.schedule={cfg.schedule!r}: expected 'cosine', 'wsd' "
                     "or 'constant'")
  return optax.join_schedules([ramp, tail], [warmup])


def _decay_mask(params):
  # No weight decay on norms' scales (1-D): decaying them pulls them to 0.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping; returns (tx, schedule)."""
  schedule = make_schedule(cfg, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=_decay_mask))
  return tx, schedule
