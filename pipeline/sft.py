"""Supervised fine-tuning: masked next-token cross-entropy on assistant tokens."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import optax
from absl import logging

from losses.ce import masked_cross_entropy
from pipeline import checkpoint, evaluate, loop, sharding
from pipeline import state as state_lib
from pipeline import stage_data
from pipeline.optim import make_optimizer


def _microbatches(batch: dict, accum_steps: int) -> dict:
  """[B, T] -> [A, B/A, T], micro-batch i = rows i, i+A, i+2A, ...

  Strided rather than contiguous so that every micro-batch stays spread over
  all devices of the batch-sharded axis.
  """
  def split(x):
    return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def loss_and_metrics(params, batch, spec: state_lib.ModelSpec):
  """Summed (un-normalised) CE over one (micro-)batch and its metric sums."""
  model = state_lib.merge(spec, params)
  logits = model(batch['inputs'], batch['positions'], batch['segment_ids']).logits
  return masked_cross_entropy(logits, batch['targets'], batch['loss_mask'], normalizer=1.0)


def train_step(state, batch, *, spec: state_lib.ModelSpec,
               tx: optax.GradientTransformation, schedule, accum_steps: int):
  """One optimizer step on a global batch; pure, jitted once by `run`.

  Gradients of the summed loss are accumulated over `accum_steps`
  micro-batches and divided by the global number of response tokens, so the
  update equals that of the full-batch token mean whatever accum_steps is.
  """
  grad_fn = jax.grad(loss_and_metrics, has_aux=True)
  params = state['params']
  if accum_steps == 1:
    grads, sums = grad_fn(params, batch, spec)
  else:
    def body(carry, micro):
      grads, sums = grad_fn(params, micro, spec)
      return jax.tree.map(jnp.add, carry, (grads, sums)), None
    micro = _microbatches(batch, accum_steps)
    zeros = jax.tree.map(jnp.zeros_like, params)
    zero_sums = {'loss_sum': 0.0, 'num_tokens': 0.0, 'correct_sum': 0.0}
    (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), micro)
  num_tokens = jnp.maximum(sums['num_tokens'], 1.0)
  grads = jax.tree.map(lambda g: g / num_tokens, grads)
  updates, opt_state = tx.update(grads, state['opt_state'], params)
  new_state = {'params': optax.apply_updates(params, updates), 'opt_state': opt_state,
               'step': state['step'] + 1, 'rng': state['rng']}
  metrics = {'loss': sums['loss_sum'] / num_tokens,
             'token_accuracy': sums['correct_sum'] / num_tokens,
             'grad_norm': optax.tree.norm(grads),
             'lr': schedule(state['step']),
             'num_tokens': sums['num_tokens']}
  return new_state, metrics


def jit_train_step(spec, tx, schedule, accum_steps, state_shardings, batch_sharding):
  """The jitted step: explicit shardings, state donated (updated in place)."""
  step = functools.partial(train_step, spec=spec, tx=tx, schedule=schedule,
                           accum_steps=accum_steps)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def check_batch_config(cfg, mesh) -> None:
  """Batch-size arithmetic errors, caught before any compute."""
  ways = 1
  for axis in ('data', 'fsdp'):
    ways *= mesh.shape[axis]
  if cfg.batch_size % cfg.grad_accum:
    raise ValueError(f'stage {cfg.name!r}: batch_size={cfg.batch_size} must be a multiple '
                     f'of grad_accum={cfg.grad_accum}')
  if (cfg.batch_size // cfg.grad_accum) % ways:
    raise ValueError(f'stage {cfg.name!r}: micro-batch {cfg.batch_size // cfg.grad_accum} '
                     f'rows must divide over the {ways} devices of the data x fsdp mesh axes')
  if cfg.batch_size % jax.process_count():
    raise ValueError(f'stage {cfg.name!r}: batch_size={cfg.batch_size} must divide over '
                     f'{jax.process_count()} processes')


def run(cfg, ctx: loop.StageContext) -> dict:
  """Trains `cfg.model` on the stage's data; returns {'steps', 'eval'}."""
  check_batch_config(cfg, ctx.mesh)
  spec = state_lib.model_spec(ctx.models[cfg.model], ctx.mesh, ctx.rules)
  if ctx.init_params_path:
    params = checkpoint.load_params(ctx.init_params_path, state_lib.abstract_params(spec))
    logging.info('%s: starting from %s', ctx.name, ctx.init_params_path)
  else:
    params = state_lib.init_params(spec, ctx.seed)
  tx, schedule = make_optimizer(cfg.optim, cfg.steps)
  state, state_shardings = state_lib.init_train_state(spec, params, tx, ctx.mesh, ctx.seed)
  batch_sharding = sharding.batch_sharding(ctx.mesh, ctx.rules)
  step_fn = jit_train_step(spec, tx, schedule, cfg.grad_accum, state_shardings, batch_sharding)

  data = stage_data.load(cfg.data, seed=ctx.data_seed)
  train_iter = stage_data.train_iterator(data, ctx.tokenizer, cfg, seed=ctx.seed)
  state, history = loop.train_loop(
      ctx, state=state, step_fn=step_fn, data_iter=train_iter, total_steps=cfg.steps,
      checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
      tokens_per_step=cfg.batch_size * cfg.seq_len, batch_sharding=batch_sharding,
      eval_fn=evaluate.periodic_eval_fn(spec, ctx.tokenizer, ctx.eval_records, cfg.eval,
                                        seed=ctx.seed),
      eval_every=cfg.eval.eval_every)
  checkpoint.save_params(os.path.join(ctx.stage_dir, 'final'), state['params'])
  checkpoint.write_model_meta(ctx.stage_dir, ctx.tokenizer, spec.config)
  metrics = evaluate.evaluate(spec, state['params'], ctx.tokenizer, ctx.eval_records, cfg.eval,
                              seed=ctx.seed, items_path=ctx.eval_items_path)
  if rows := loop.train_rows(history):
    metrics['final_train_loss'] = rows[-1]['loss']
  return {'steps': cfg.steps, 'eval': metrics, 'history': history}
