"""Ahead-of-time compile of the train steps for a big target, without the hardware.

  python -m experiments.aot_compile --model=7b --devices=64 --mesh=1,64,1 \
      --batch_size=64 --seq_len=2048 --scan_layers --remat=nothing
  python -m experiments.aot_compile --model=7b --devices=256 --mesh=4,16,4 --steps=sft

Emulates `--devices` CPU devices (XLA_FLAGS, set before jax loads), builds
the run's mesh and shardings from the default rules table, describes the
train state and batches as `jax.ShapeDtypeStruct`s carrying those shardings
(no weight is ever allocated), then lowers and compiles the SFT,
distillation (the 7B teacher into `--student`) and GRPO train steps exactly
as the stages jit them, and prints `compiled.memory_analysis()` per device:

  arguments   the state's and batch's shards on one device (exact: set by the shardings)
  outputs     the new state's shards (aliased onto the arguments: the state is donated)
  temp        activations, gradients and workspace, as XLA:CPU schedules them
  peak        arguments + outputs - aliased + temp

The argument bytes are what a TPU or GPU holds too. Temp comes from the CPU
compiler, whose fusion and scheduling differ from the TPU/GPU compilers'
(it keeps float32 copies of bfloat16 matmul operands, for one), so read it
as an estimate of the activation memory, not a promise; compiling on the
target (or with libtpu's topology-only compile) gives the exact figure.
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import os
import sys


def _device_count_from_argv(argv: list[str]) -> int:
  for arg in argv:
    if arg.startswith('--devices='):
      return int(arg.split('=', 1)[1])
  return 8


if __name__ == '__main__':  # before jax is imported: the emulated devices
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_'
                             f'device_count={_device_count_from_argv(sys.argv)}').strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from configs import common
from losses import distill as distill_losses
from models.llama import REMAT_POLICIES, ModelConfig
from pipeline import distill, grpo, sft, sharding
from pipeline import state as state_lib
from pipeline.optim import make_optimizer

# Llama-2-7B and a Llama-3.2-1B-shaped student (the vocab is the run's: --vocab_size).
PRESETS = {
    '7b': dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
               mlp_dim=11008, tie_embeddings=False),
    '1b': dict(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
               mlp_dim=8192, tie_embeddings=True),
    'tiny': dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=128, tie_embeddings=True),
}
STEPS = ('sft', 'distill', 'grpo')

FLAGS = flags.FLAGS


def model_config(preset: str, *, vocab_size: int, dtype: str, remat: str,
                 scan_layers: bool) -> ModelConfig:
  if preset not in PRESETS:
    raise ValueError(f'model {preset!r} is not a preset: {sorted(PRESETS)}')
  return ModelConfig(vocab_size=vocab_size, dtype=dtype, remat=remat != 'off',
                     remat_policy='nothing' if remat == 'off' else remat,
                     scan_layers=scan_layers, **PRESETS[preset])


def _sds(shape, dtype, sharding_):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def _batch(keys_dtypes: dict, b: int, t: int, bs) -> dict:
  return {k: _sds((b, t) if per_token else (b,), dtype, bs)
          for k, (dtype, per_token) in keys_dtypes.items()}


def lower_sft(model: ModelConfig, mesh, rules, batch_size: int, seq_len: int):
  spec = state_lib.model_spec(model, mesh, rules)
  tx, schedule = make_optimizer(common.optim(), total_steps=1000)
  state = state_lib.abstract_train_state(spec, tx, mesh)
  bs = sharding.batch_sharding(mesh, rules)
  fn = sft.jit_train_step(spec, tx, schedule, 1, jax.tree.map(lambda x: x.sharding, state), bs)
  batch = _batch({'inputs': (jnp.int32, True), 'targets': (jnp.int32, True),
                  'loss_mask': (jnp.float32, True), 'segment_ids': (jnp.int32, True),
                  'positions': (jnp.int32, True)}, batch_size, seq_len, bs)
  return fn.lower(state, batch)


def lower_distill(teacher: ModelConfig, student: ModelConfig, mesh, rules, batch_size: int,
                  seq_len: int, pairs_per_step: int = 8):
  """All three levels on (logit, hidden, preference), as the default config.
  pairs_per_step is rounded up to a multiple of the batch axis' devices, as
  the stage needs it to be."""
  ways = mesh.shape['data'] * mesh.shape['fsdp']
  pairs_per_step = -(-pairs_per_step // ways) * ways
  s_spec = state_lib.model_spec(student, mesh, rules)
  t_spec = state_lib.model_spec(teacher, mesh, rules)
  loss_cfg = distill.LossConfig(**{**common.distill_loss().to_dict(),
                                   'layer_map': distill_losses.uniform_layer_map(
                                       student.num_layers, teacher.num_layers)})
  tx, schedule = make_optimizer(common.optim(), total_steps=1000)
  projection = jax.ShapeDtypeStruct((len(loss_cfg.layer_map), student.d_model,
                                     teacher.d_model), jnp.float32)
  state = state_lib.abstract_train_state(s_spec, tx, mesh, extras={'projection': projection})
  bs = sharding.batch_sharding(mesh, rules)
  step = functools.partial(distill.train_step, student=s_spec, teacher=t_spec, tx=tx,
                           schedule=schedule, loss_cfg=loss_cfg)
  fn = jax.jit(step, in_shardings=(jax.tree.map(lambda x: x.sharding, state),
                                   t_spec.param_shardings, bs, bs),
               out_shardings=(jax.tree.map(lambda x: x.sharding, state), None),
               donate_argnums=0)
  batch = _batch({'inputs': (jnp.int32, True), 'targets': (jnp.int32, True),
                  'loss_mask': (jnp.float32, True), 'segment_ids': (jnp.int32, True),
                  'positions': (jnp.int32, True)}, batch_size, seq_len, bs)
  side = {'inputs': (jnp.int32, True), 'targets': (jnp.int32, True),
          'positions': (jnp.int32, True), 'mask': (jnp.float32, True)}
  pairs = {}
  for name in ('chosen', 'rejected'):
    pairs.update({f'{name}_{k}': v for k, v in _batch(side, pairs_per_step, seq_len, bs).items()})
    pairs[f'ref_{name}'] = _sds((pairs_per_step,), jnp.float32, bs)
  return fn.lower(state, state_lib.abstract_params(t_spec), batch, pairs)


def lower_grpo(model: ModelConfig, mesh, rules, batch_size: int, seq_len: int):
  spec = state_lib.model_spec(model, mesh, rules)
  gcfg = grpo.GRPOConfig(**{**common.grpo_stage('x', model='m', steps=1, sources={},
                                                rewards={}).grpo.to_dict(),
                            'max_new_tokens': seq_len // 2})
  tx, schedule = make_optimizer(common.optim(), total_steps=1000)
  state = state_lib.abstract_train_state(spec, tx, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  bs = sharding.batch_sharding(mesh, rules)
  fn = jax.jit(functools.partial(grpo.train_step, spec=spec, tx=tx, schedule=schedule,
                                 cfg=gcfg),
               in_shardings=(shardings, bs), out_shardings=(shardings, None), donate_argnums=0)
  batch = _batch({'inputs': (jnp.int32, True), 'targets': (jnp.int32, True),
                  'positions': (jnp.int32, True), 'mask': (jnp.float32, True),
                  'old_logp': (jnp.float32, True), 'advantages': (jnp.float32, False),
                  'truncated': (jnp.bool_, False)}, batch_size, seq_len, bs)
  return fn.lower(state, batch)


def memory(compiled) -> dict:
  """Per-device bytes from XLA's buffer assignment of the compiled step."""
  m = compiled.memory_analysis()
  out = {'argument_bytes': m.argument_size_in_bytes, 'output_bytes': m.output_size_in_bytes,
         'alias_bytes': m.alias_size_in_bytes, 'temp_bytes': m.temp_size_in_bytes,
         'code_bytes': m.generated_code_size_in_bytes}
  out['peak_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes'] +
                       out['temp_bytes'])
  return out


def compile_steps(model: ModelConfig, student: ModelConfig, mesh, rules, *, batch_size: int,
                  seq_len: int, steps=STEPS) -> dict[str, dict]:
  """{step name: memory() + compile seconds} for each requested train step."""
  unknown = set(steps) - set(STEPS)
  if unknown:
    raise ValueError(f'--steps has unknown names {sorted(unknown)}; valid: {STEPS}')
  ways = mesh.shape['data'] * mesh.shape['fsdp']
  if batch_size % ways:
    raise ValueError(f'batch_size={batch_size} must divide over the data x fsdp = {ways} '
                     'devices of the batch axis')
  lowerers = {'sft': lambda: lower_sft(model, mesh, rules, batch_size, seq_len),
              'distill': lambda: lower_distill(model, student, mesh, rules, batch_size, seq_len),
              'grpo': lambda: lower_grpo(model, mesh, rules, batch_size, seq_len)}
  out = {}
  with jax.set_mesh(mesh):
    for name in steps:
      t0 = time.perf_counter()
      compiled = lowerers[name]().compile()
      out[name] = {**memory(compiled), 'compile_s': round(time.perf_counter() - t0, 1)}
  return out


def markdown(results: dict, header: str) -> str:
  gib = lambda b: f'{b / 2**30:.2f}'
  lines = [header, '', '| step | arguments GiB | outputs GiB | aliased GiB | temp GiB '
           '| peak GiB | compile s |', '|---|---|---|---|---|---|---|']
  for name, m in results.items():
    lines.append(f"| {name} | {gib(m['argument_bytes'])} | {gib(m['output_bytes'])} | "
                 f"{gib(m['alias_bytes'])} | {gib(m['temp_bytes'])} | {gib(m['peak_bytes'])} | "
                 f"{m['compile_s']} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  if jax.device_count() != FLAGS.devices:
    raise ValueError(f'--devices={FLAGS.devices} but jax sees {jax.device_count()} devices; '
                     'run this as `python -m experiments.aot_compile` so it can set XLA_FLAGS')
  try:
    shape = tuple(int(s) for s in FLAGS.mesh.split(','))
  except ValueError:
    raise ValueError(f'--mesh={FLAGS.mesh!r}: expected three integers, e.g. 1,64,1') from None
  mesh = sharding.make_mesh(shape)
  rules = common.DEFAULT_RULES
  kwargs = dict(vocab_size=FLAGS.vocab_size, dtype=FLAGS.dtype, remat=FLAGS.remat,
                scan_layers=FLAGS.scan_layers)
  model = model_config(FLAGS.model, **kwargs)
  student = model_config(FLAGS.student, **kwargs)
  batch_size = FLAGS.batch_size or jax.device_count()
  results = compile_steps(model, student, mesh, rules, batch_size=batch_size,
                          seq_len=FLAGS.seq_len, steps=tuple(FLAGS.steps))
  header = (f'{FLAGS.model} ({model.num_params() / 1e9:.2f}B params; distill student '
            f'{FLAGS.student}, {student.num_params() / 1e9:.2f}B) on {jax.device_count()} '
            f'devices, mesh (data, fsdp, tensor) = {tuple(mesh.shape.values())}, '
            f'B={batch_size} x T={FLAGS.seq_len}, {FLAGS.dtype} compute, float32 params + AdamW, '
            f'remat={FLAGS.remat}, scan_layers={FLAGS.scan_layers}; bytes per device:')
  print(markdown(results, header))
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out, 'w') as f:
    json.dump({'command': ' '.join(sys.argv), 'model': dataclasses.asdict(model),
               'student': dataclasses.asdict(student), 'mesh': tuple(mesh.shape.values()),
               'batch_size': batch_size, 'seq_len': FLAGS.seq_len, 'steps': results}, f, indent=2)
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  # Defined here, not at import: tests import this module next to others
  # whose flags share names.
  flags.DEFINE_enum('model', '7b', list(PRESETS), 'The model trained (and the teacher).')
  flags.DEFINE_enum('student', '1b', list(PRESETS), 'The distillation student.')
  flags.DEFINE_integer('vocab_size', 32000, 'Vocabulary V (shared by both models).')
  flags.DEFINE_integer('devices', 8, 'Devices of the target (emulated on CPU).')
  flags.DEFINE_string('mesh', '1,-1,1', "('data', 'fsdp', 'tensor') sizes; one may be -1.")
  flags.DEFINE_integer('batch_size', 0, 'Global batch B (0 = one row per device).')
  flags.DEFINE_integer('seq_len', 2048, 'Tokens per row T.')
  flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16'], 'Compute dtype.')
  flags.DEFINE_enum('remat', 'nothing', ['off', *REMAT_POLICIES],
                    "Rematerialise each block: 'off' or a ModelConfig.remat_policy.")
  flags.DEFINE_bool('scan_layers', True, 'Scan over stacked layers (ModelConfig.scan_layers).')
  flags.DEFINE_list('steps', list(STEPS), f'Which train steps to compile, of {STEPS}.')
  flags.DEFINE_string('out', 'experiments/results/aot_compile.json', 'JSON output.')
  app.run(main)
