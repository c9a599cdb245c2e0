"""Runs a config's ordered stages, skipping finished ones, resuming the first
unfinished one from its latest checkpoint.

workdir/
  config.json           the resolved config of the run
  summary.json          {"stages": [{"name", "kind", "status", "steps", "wall_s", "eval"}],
                         "untrained": {"model", "eval"}}  (the baseline)
  tokenizer/            the sentencepiece model trained on the run's corpus
  <stage name>/         checkpoints/, final/, tensorboard/, eval.md, history.json,
                        eval_items.jsonl (per held-out item: score, completion)
  untrained/            eval_items.jsonl of the baseline
  hf_init/<model>/final a Hugging Face checkpoint converted to our params, once
                        (models with `hf_checkpoint`; the tokenizer folder then
                        holds that checkpoint's tokenizer files instead)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

import jax
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from data.hf_tokenizer import HFTokenizer, is_hf_tokenizer_dir
from data.tokenizer import Tokenizer, train_tokenizer
from models import hf
from models.llama import ModelConfig
from pipeline import checkpoint, distill, evaluate, grpo, loop, reward_model, sft, sharding
from pipeline import stage_data
from pipeline import state as state_lib

STAGE_KINDS = {'sft': sft.run, 'distill': distill.run, 'reward_model': reward_model.run,
               'grpo': grpo.run}


def check_workdir(workdir: str) -> None:
  """Fails early (before any compute) when the workdir cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f'--workdir={workdir} is not a writable directory: {e}') from e


def validate(config) -> None:
  """Config errors that would otherwise surface mid-run."""
  names = [s.name for s in config.stages]
  if len(set(names)) != len(names):
    raise ValueError(f'config.stages names must be unique, got {names}')
  if config.stop_after and config.stop_after not in names:
    raise ValueError(f'config.stop_after={config.stop_after!r} is not a stage name {names}')
  for i, stage in enumerate(config.stages):
    if stage.kind not in STAGE_KINDS:
      raise ValueError(f'config.stages[{i}].kind={stage.kind!r} (stage {stage.name!r}) is '
                       f'not a stage kind; valid kinds: {sorted(STAGE_KINDS)}')
    for field in ('model', 'teacher'):
      if field in stage and stage[field] not in config.models:
        raise ValueError(f'config.stages[{i}].{field}={stage[field]!r} is not in '
                         f'config.models ({sorted(config.models)})')
    if stage.init_from == 'hf' and not _hf_checkpoint(config, stage.model):
      raise ValueError(f"config.stages[{i}].init_from='hf' but config.models.{stage.model} "
                       'has no hf_checkpoint')
  budgets = {s.name: s.eval.max_new_tokens for s in config.stages
             if 'eval' in s and 'max_new_tokens' in s.eval}
  if len(set(budgets.values())) > 1:
    raise ValueError(f'config.stages[*].eval.max_new_tokens differ ({budgets}): every stage '
                     'is scored on the run\'s one held-out suite, and its rows compare only '
                     'under one generation budget')
  sampled = {s.name: (s.eval.samples, s.eval.temperature) for s in config.stages
             if 'eval' in s and s.eval.get('samples', 0)}
  if len(set(sampled.values())) > 1:
    raise ValueError(f'config.stages[*].eval.(samples, temperature) differ ({sampled}): '
                     'sampled pass@1 compares across stages only under one k and temperature')
  for name, model in config.models.items():
    if _hf_checkpoint(config, name):
      # Reads config.json only: a wrong path or an unsupported architecture
      # fails here, before any data is loaded.
      hf.model_config(model.hf_checkpoint)


def _hf_checkpoint(config, model: str) -> str:
  """The local Hugging Face checkpoint `model` starts from ('' = none)."""
  return config.models[model].get('hf_checkpoint', '') or ''


def model_configs(config, vocab_size: int) -> dict[str, ModelConfig]:
  """ModelConfigs from config.models; the vocab comes from the run's tokenizer.

  A model with `hf_checkpoint` takes its shapes from that checkpoint's
  config.json; its other keys (dtype, remat) override the rest.
  """
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  out = {}
  for name, cfg in config.models.items():
    unknown = set(cfg.keys()) - fields - {'hf_checkpoint'}
    if unknown:
      raise ValueError(f'config.models.{name} has unknown keys {sorted(unknown)}; '
                       f'valid: {sorted(fields | {"hf_checkpoint"})}')
    if _hf_checkpoint(config, name):
      overrides = {k: v for k, v in cfg.to_dict().items() if k != 'hf_checkpoint'}
      out[name] = hf.model_config(cfg.hf_checkpoint, **overrides)
      if out[name].vocab_size != vocab_size:
        raise ValueError(f'config.models.{name}.hf_checkpoint={cfg.hf_checkpoint} has '
                         f'vocab_size={out[name].vocab_size} but the run\'s tokenizer has '
                         f'{vocab_size}: every model of a run must share one tokenizer')
      continue
    kwargs = {'vocab_size': vocab_size, **{k: v for k, v in cfg.to_dict().items()
                                           if k != 'hf_checkpoint'}}
    if kwargs['vocab_size'] != vocab_size:
      raise ValueError(f'config.models.{name}.vocab_size={kwargs["vocab_size"]} but the '
                       f'tokenizer has {vocab_size} tokens')
    out[name] = ModelConfig(**kwargs)
  return out


def run_data(config) -> tuple[list[dict], list[dict]]:
  """All stages' training records and the run's held-out suite: the union of
  every stage's eval records, so that every stage is measured on the same items.
  No held-out item may appear in any stage's training data."""
  train, eval_ = [], {}
  for stage in config.stages:
    data = stage_data.load(stage.data, seed=config.seed)
    train += data.all_train()
    eval_.update((r['id'], r) for r in data.eval)
  eval_ = list(eval_.values())
  stage_data.check_no_leak(train, eval_)
  return train, eval_


def load_run_config(workdir: str) -> ConfigDict:
  """A finished run's resolved config (its config.json), stages included as
  ConfigDicts, for tools that reload a run's models and data."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: not a pipeline run folder (no config.json)')
  with open(path) as f:
    config = ConfigDict(json.load(f))
  config.stages = [ConfigDict(stage) for stage in config.stages]
  return config


def load_policy(workdir: str, stage: str):
  """(run config, tokenizer, model spec, params) of a finished policy stage,
  on one device: for tools that sample from a run's checkpoints."""
  config = load_run_config(workdir)
  stages = {s.name: s for s in config.stages}
  if stage not in stages:
    raise ValueError(f'stage {stage!r} is not a stage of {workdir}: {sorted(stages)}')
  if stages[stage].kind == 'reward_model':
    raise ValueError(f'stage {stage!r} is a reward model, not a policy to sample from')
  tokenizer = load_tokenizer(os.path.join(workdir, 'tokenizer'))
  model_cfg = model_configs(config, tokenizer.vocab_size)[stages[stage].model]
  spec = state_lib.model_spec(model_cfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1]), ())
  params = checkpoint.load_params(os.path.join(workdir, stage, 'final'),
                                  state_lib.abstract_params(spec))
  return config, tokenizer, spec, params


def load_tokenizer(folder: str) -> Tokenizer | HFTokenizer:
  """A run's tokenizer folder: a checkpoint's tokenizer files, or ours."""
  if is_hf_tokenizer_dir(folder):
    return HFTokenizer.load(folder)
  return Tokenizer.load(os.path.join(folder, 'tokenizer.model'))


def ensure_tokenizer(config, workdir: str,
                     train_records: list[dict]) -> Tokenizer | HFTokenizer:
  """Trains the run's tokenizer on its training corpus once; later runs load it.

  When models start from Hugging Face checkpoints, the run uses their
  tokenizer and chat template instead (all of them must share it).
  """
  checkpoints = [_hf_checkpoint(config, m) for m in config.models
                 if _hf_checkpoint(config, m)]
  if checkpoints:
    tokenizers = [HFTokenizer.load(c) for c in checkpoints]
    for c, t in zip(checkpoints[1:], tokenizers[1:]):
      if t.fingerprint() != tokenizers[0].fingerprint():
        raise ValueError(f'the tokenizers of {checkpoints[0]} and {c} differ; every model of '
                         'a run must share one tokenizer (and chat template)')
    folder = os.path.join(workdir, 'tokenizer')
    if jax.process_index() == 0:
      tokenizers[0].save(folder)  # a record of the run, read by export_hf
    multihost_utils.sync_global_devices('tokenizer')
    return tokenizers[0]
  path = os.path.join(workdir, 'tokenizer', 'tokenizer.model')
  if not os.path.exists(path) and jax.process_index() == 0:
    texts = [m['content'] for r in train_records for m in r['messages']]
    train_tokenizer(texts, config.tokenizer.vocab_size, os.path.dirname(path))
  multihost_utils.sync_global_devices('tokenizer')
  return Tokenizer.load(path)


class Summary:
  """summary.json: one entry per stage, rewritten atomically after each stage."""

  def __init__(self, workdir: str, config, write: bool):
    self.path = os.path.join(workdir, 'summary.json')
    self.write_enabled = write
    old, self.untrained = {}, None
    if os.path.exists(self.path):
      with open(self.path) as f:
        saved = json.load(f)
      old = {s['name']: s for s in saved['stages']}
      self.untrained = saved.get('untrained')
    self.stages = [old.get(s.name) or {'name': s.name, 'kind': s.kind, 'status': 'pending',
                                       'steps': 0, 'wall_s': 0.0, 'eval': {}}
                   for s in config.stages]

  def entry(self, name: str) -> dict:
    return next(s for s in self.stages if s['name'] == name)

  def save(self) -> None:
    if not self.write_enabled:
      return
    extra = {'untrained': self.untrained} if self.untrained else {}
    checkpoint.write_json(self.path, {'stages': self.stages, **extra}, indent=2)


def _hf_params_path(workdir: str, model: str) -> str:
  return os.path.join(workdir, 'hf_init', model, 'final')


def _latest_params(config, index: int, model: str, workdir: str) -> str | None:
  """Final params of the last stage before `index` that trained `model` as a
  policy (a reward_model stage trains a copy with a head; it is skipped);
  before any, the model's Hugging Face checkpoint if it has one."""
  for prev in reversed(config.stages[:index]):
    if prev.model == model and prev.kind != 'reward_model':
      return os.path.join(workdir, prev.name, 'final')
  if _hf_checkpoint(config, model):
    return _hf_params_path(workdir, model)
  return None


def ensure_hf_params(config, model: str, model_cfg: ModelConfig, mesh, rules, tokenizer,
                     workdir: str) -> str:
  """Converts `model`'s Hugging Face checkpoint to a params checkpoint once
  (tensor by tensor onto the mesh, then a collective orbax save), so that
  every stage loads it like any other stage's final params."""
  path = _hf_params_path(workdir, model)
  if not os.path.isdir(path):
    source = _hf_checkpoint(config, model)
    logging.info('importing %s from %s', model, source)
    spec = state_lib.model_spec(model_cfg, mesh, rules)
    with jax.set_mesh(mesh):
      params = hf.load_params(source, model_cfg, spec.param_shardings)
    checkpoint.save_params(path, params)
    checkpoint.write_model_meta(os.path.dirname(path), tokenizer, model_cfg)
  return path


def _init_params_path(config, index: int, workdir: str) -> str | None:
  """Where stage `index` starts: 'scratch', 'previous' (the last earlier stage
  that trained the same model), 'teacher_layers' (distill: built by the
  stage from its teacher) or an explicit params checkpoint path."""
  stage = config.stages[index]
  if stage.init_from in ('scratch', 'teacher_layers'):
    return None
  if stage.init_from == 'hf':
    return _hf_params_path(workdir, stage.model)
  if stage.init_from == 'previous':
    return _latest_params(config, index, stage.model, workdir)
  return stage.init_from


def _teacher_params_path(config, index: int, workdir: str) -> str | None:
  stage = config.stages[index]
  if 'teacher' not in stage:
    return None
  return stage.teacher_from or _latest_params(config, index, stage.teacher, workdir)


def _reward_model(config, index: int, workdir: str) -> dict:
  """The reward model a GRPO stage scores with: an earlier stage, by name."""
  name = config.stages[index].get('reward_model')
  if not name:
    return {}
  earlier = {s.name: s for s in config.stages[:index]}
  if name not in earlier:
    raise ValueError(f'config.stages[{index}].reward_model={name!r} is not an earlier stage '
                     f'({sorted(earlier)})')
  return {'reward_model_path': os.path.join(workdir, name, 'final'),
          'reward_model_name': earlier[name].model}


def _held_out(spec, params, tokenizer, eval_records, eval_cfg, seed: int, folder: str) -> dict:
  """The held-out suite's metrics; process 0 writes the per-item scores in `folder`."""
  items_path = None
  if jax.process_index() == 0:
    os.makedirs(folder, exist_ok=True)
    items_path = os.path.join(folder, loop.EVAL_ITEMS_FILE)
  return evaluate.evaluate(spec, params, tokenizer, eval_records, eval_cfg, seed=seed,
                           items_path=items_path)


def _eval_untrained(config, models, mesh, rules, tokenizer, eval_records, workdir) -> dict:
  """The held-out suite on the first stage's model at initialisation (its
  Hugging Face weights, if it has some): the baseline every stage's gains
  are read against."""
  first = config.stages[0]
  with jax.set_mesh(mesh):
    spec = state_lib.model_spec(models[first.model], mesh, rules)
    if _hf_checkpoint(config, first.model):
      path = ensure_hf_params(config, first.model, models[first.model], mesh, rules,
                              tokenizer, workdir)
      params = checkpoint.load_params(path, state_lib.abstract_params(spec))
    else:
      params = state_lib.init_params(spec, config.seed)
    metrics = _held_out(spec, params, tokenizer, eval_records, first.eval, config.seed,
                        os.path.join(workdir, 'untrained'))
  logging.info('untrained %s: %s', first.model, metrics)
  return {'model': first.model, 'eval': metrics}


def _write_eval_table(stage_dir: str, name: str, metrics: dict) -> None:
  rows = [f'| {k} | {v:.4f} |' if isinstance(v, float) else f'| {k} | {v} |'
          for k, v in metrics.items()]
  with open(os.path.join(stage_dir, 'eval.md'), 'w') as f:
    f.write(f'# {name}: held-out evaluation\n\n| metric | value |\n|---|---|\n')
    f.write('\n'.join(rows) + '\n')


def _setup(config, workdir: str, write_config: bool):
  """(mesh, rules, held-out records, tokenizer, model configs): what running
  or re-evaluating stages needs; write_config: record `config` in the run's
  config.json."""
  if write_config:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  rules = tuple(tuple(r) for r in config.mesh.rules)
  train_records, eval_records = run_data(config)
  tokenizer = ensure_tokenizer(config, workdir, train_records)
  return mesh, rules, eval_records, tokenizer, model_configs(config, tokenizer.vocab_size)


def run_pipeline(config, workdir: str) -> dict:
  """Runs every unfinished stage in order; returns the summary dict."""
  validate(config)
  workdir = os.path.abspath(workdir)  # orbax refuses relative checkpoint paths
  check_workdir(workdir)
  is_logger = jax.process_index() == 0
  mesh, rules, eval_records, tokenizer, models = _setup(config, workdir, write_config=is_logger)
  summary = Summary(workdir, config, write=is_logger)
  if config.eval_untrained and summary.untrained is None:
    summary.untrained = _eval_untrained(config, models, mesh, rules, tokenizer, eval_records,
                                        workdir)
    summary.save()
  for index, stage in enumerate(config.stages):
    entry = summary.entry(stage.name)
    if entry['status'] == 'done':
      logging.info('stage %s: done already, skipping', stage.name)
      if stage.name == config.stop_after:
        break
      continue
    stage_dir = os.path.join(workdir, stage.name)
    os.makedirs(stage_dir, exist_ok=True)
    for model in dict.fromkeys([stage.model, stage.get('teacher', stage.model)]):  # ordered
      hf_path = _hf_params_path(workdir, model)
      if hf_path in (_init_params_path(config, index, workdir),
                     _teacher_params_path(config, index, workdir)):
        ensure_hf_params(config, model, models[model], mesh, rules, tokenizer, workdir)
    ctx = loop.StageContext(
        name=stage.name, stage_dir=stage_dir, mesh=mesh, rules=rules, tokenizer=tokenizer,
        seed=config.seed + index, data_seed=config.seed, models=models,
        eval_records=eval_records,
        init_params_path=_init_params_path(config, index, workdir),
        teacher_params_path=_teacher_params_path(config, index, workdir),
        is_logger=is_logger, **_reward_model(config, index, workdir))
    entry['status'] = 'running'
    summary.save()
    t0 = time.perf_counter()
    try:
      with jax.set_mesh(mesh):
        result = STAGE_KINDS[stage.kind](stage, ctx)
    finally:
      entry['wall_s'] = round(entry['wall_s'] + time.perf_counter() - t0, 2)
      summary.save()
    entry.update(status='done', steps=result['steps'], eval=result['eval'])
    summary.save()
    if is_logger:
      _write_eval_table(stage_dir, stage.name, result['eval'])
      checkpoint.write_json(os.path.join(stage_dir, 'history.json'), result['history'])
    # Files process 0 wrote in the stage (e.g. a reward model's statistics)
    # are read by every process in later stages: wait for them.
    multihost_utils.sync_global_devices(f'stage {stage.name} done')
    logging.info('stage %s done: %s', stage.name, result['eval'])
    if stage.name == config.stop_after:
      logging.info('stopping after %s (config.stop_after)', stage.name)
      break
  return {'stages': summary.stages}


def reevaluate(config, workdir: str, names: list[str]) -> dict:
  """Scores finished stages' final params on the held-out suite again, under
  `config`'s eval settings (e.g. eval.samples turned on after the run), and
  updates their summary entries, eval.md and eval_items.jsonl; trains nothing
  and leaves config.json (the config that trained them) as it was."""
  validate(config)
  workdir = os.path.abspath(workdir)
  if not os.path.exists(os.path.join(workdir, 'summary.json')):
    raise FileNotFoundError(f'{workdir}: no summary.json, nothing to re-evaluate')
  is_logger = jax.process_index() == 0
  summary = Summary(workdir, config, write=is_logger)
  index = {s.name: i for i, s in enumerate(config.stages)}
  for name in names:
    if name not in index:
      raise ValueError(f'--reevaluate: {name!r} is not a stage of the config ({sorted(index)})')
    if config.stages[index[name]].kind == 'reward_model':
      raise ValueError(f'--reevaluate: {name!r} is a reward model; it has no held-out suite')
    if summary.entry(name)['status'] != 'done':
      raise ValueError(f'--reevaluate: stage {name!r} has not finished in {workdir}; run it')
  # config.json stays the config that trained the stages; the eval settings
  # used here are in the metrics (sampled/k, sampled/temperature).
  mesh, rules, eval_records, tokenizer, models = _setup(config, workdir, write_config=False)
  for name in names:
    stage, stage_dir = config.stages[index[name]], os.path.join(workdir, name)
    with jax.set_mesh(mesh):
      spec = state_lib.model_spec(models[stage.model], mesh, rules)
      params = checkpoint.load_params(os.path.join(stage_dir, 'final'),
                                      state_lib.abstract_params(spec))
      metrics = _held_out(spec, params, tokenizer, eval_records, stage.eval,
                          config.seed + index[name], stage_dir)
    entry = summary.entry(name)
    entry['eval'].update(metrics)
    summary.save()
    if is_logger:
      _write_eval_table(stage_dir, name, entry['eval'])
    logging.info('stage %s re-evaluated: %s', name, metrics)
  return {'stages': summary.stages}


def copy_run_without(base: str, target: str, dropped: list[str]) -> None:
  """Copies a run's folder without the `dropped` stages, which its summary marks
  pending, so running the copy re-runs them from the kept stages (ablations)."""
  if os.path.exists(os.path.join(target, 'summary.json')):
    return  # resuming the ablation
  shutil.copytree(base, target, ignore=shutil.ignore_patterns(*dropped))
  with open(os.path.join(target, 'summary.json')) as f:
    summary = json.load(f)
  for stage in summary['stages']:
    if stage['name'] in dropped:
      stage.update(status='pending', steps=0, wall_s=0.0, eval={})
  checkpoint.write_json(os.path.join(target, 'summary.json'), summary, indent=2)
