"""Tokens/s and MFU of the SFT train step on this host's CPU.

  PYTHONPATH=. python -m experiments.bench_train_step            # full, < 3 min
  PYTHONPATH=. python -m experiments.bench_train_step --quick    # smoke, ~20 s
  PYTHONPATH=. python -m experiments.bench_train_step --sizes=5m --steps=5

Measures (a) the float32 matmul peak of this host (best of jitted square
matmuls), then (b) the real `pipeline.sft.jit_train_step` (AdamW + clipping,
masked CE, packed-document attention) on a 1-device mesh with random token
batches, and (c) prints a markdown table and (d) writes it as JSON.

Model FLOPs (PaLM appendix B convention, forward + backward = 3x forward):
  per token = 6 * N + 12 * L * T * D
where N counts every matmul weight (attention, MLP and the unembedding, tied
or not; no norms, no embedding lookup) and the attention term counts the full
T x T score matrix (not T/2 for causality), as PaLM does. MFU = achieved model
FLOP/s / the measured matmul peak (not the CPU's theoretical peak).

On a shared host, other processes slow the wall clock: each timing keeps
only the steps during which the rest of the machine was idle (the "clean
steps" column; best of those, else best of all) and also reports this
process's CPU time per step; "MFU per CPU-s" = model FLOPs per CPU-second
/ (peak / cores), which stays meaningful when the host is busy.

The process re-executes itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1
(--nomalloc_hugepages to skip): XLA:CPU allocates the step's temp buffer
(~480 MB for the 5M model) afresh every step; glibc mmaps it and the kernel
then takes a page fault per 4 KiB page touched (~116k faults, 0.25-0.4 s of
system time per 5M step). With the tunable glibc asks for transparent huge
pages (madvise), and the faults drop ~300x. Set it for training runs too.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

from absl import app, flags

_QUICK = flags.DEFINE_bool('quick', False, 'Smoke mode: tiny shapes, 2 timed steps.')
_SIZES = flags.DEFINE_list('sizes', ['1m', '5m', '30m'],
                           f'Model sizes to run, any of 1m, 5m, 30m.')
_STEPS = flags.DEFINE_integer('steps', None, 'Timed steps per size (default 3-6 by size).')
_OUT = flags.DEFINE_string('out', 'experiments/results/bench_train_step.json',
                           'Where to write the table as JSON.')
_PEAK = flags.DEFINE_bool('peak', True, 'Measure the matmul peak (else skip MFU).')
_PEAK_GFLOPS = flags.DEFINE_float(
    'peak_gflops', None, 'Use this float32 peak for MFU instead of the measured one '
    '(on a busy host the measured peak is itself slowed down).')
_DISTILL = flags.DEFINE_bool(
    'distill', True, 'Also time the distillation step against its parts (the default '
    "config's teacher and student): the student's plain SFT step, the teacher's forward "
    'pass, and the distill step with and without the preference level.')
_HUGEPAGES = flags.DEFINE_bool(
    'malloc_hugepages', True,
    'Re-run this process with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see the module '
    'docstring); --nomalloc_hugepages measures the default allocator.')

# name -> (ModelConfig fields, batch, seq). MLP widths are SwiGLU (3 matrices).
SIZES = {
    # The teacher of configs/default.py, at its own batch shape.
    '1m': (dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                mlp_dim=384), 16, 256),
    # The PyTorch reference "5M": mlp 1024 (4 * D), not Llama's 8/3 * D = 688.
    '5m': (dict(d_model=256, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=32,
                mlp_dim=1024), 8, 256),
    '30m': (dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64,
                 mlp_dim=2048), 8, 256),
}
VOCAB = 1024
QUICK_SIZES = {
    'quick': (dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   mlp_dim=128), 4, 64),
}


def _busy_seconds() -> tuple[float, float]:
  """(CPU seconds all processes have used, CPU seconds this process has used)."""
  with open('/proc/stat') as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  idle = fields[3] + fields[4]  # idle + iowait
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK'), usage.ru_utime + usage.ru_stime


def timed(fn, repeats: int, max_repeats: int | None = None, min_s: float = 0.2) -> dict:
  """Times `fn()` (which must block until done) on a shared host.

  Other processes on the machine only ever add time, so we keep the
  measurements during which they used under 3% of one core and report the
  best of those; a measurement is retried up to max_repeats times in all to
  get `repeats` clean ones. Each measurement runs fn enough times to last
  min_s, since /proc/stat counts in 10 ms ticks. Returns per-call
  {'best_s', 'median_s', 'clean', 'calls', 'cpu_s'}; cpu_s, the least CPU
  time this process used per call, is a contention-robust proxy for the work.
  """
  max_repeats = max_repeats or 3 * repeats
  t0 = time.perf_counter()
  fn()
  inner = max(1, int(min_s / max(time.perf_counter() - t0, 1e-6)))
  all_s, clean_s, cpu_s = [], [], []
  while len(clean_s) < repeats and len(all_s) < max_repeats:
    busy0, own0 = _busy_seconds()
    t0 = time.perf_counter()
    for _ in range(inner):
      fn()
    wall = time.perf_counter() - t0
    busy1, own1 = _busy_seconds()
    others = (busy1 - busy0) - (own1 - own0)
    all_s.append(wall / inner)
    cpu_s.append((own1 - own0) / inner)
    if others < 0.03 * wall + 0.01:  # one tick of jitter
      clean_s.append(wall / inner)
  kept = sorted(clean_s or all_s)
  return {'best_s': kept[0], 'median_s': kept[len(kept) // 2],
          'clean': len(clean_s), 'calls': len(all_s), 'cpu_s': min(cpu_s)}


def matmul_peak(sizes=(1024, 1536, 2048), repeats: int = 10) -> dict:
  """Best float32 GFLOP/s of a jitted [n, n] @ [n, n] over sizes and repeats."""
  import jax
  import jax.numpy as jnp
  best, clean = {}, {}
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    t = timed(lambda: f(a, b).block_until_ready(), repeats)
    best[n] = 2 * n ** 3 / t['best_s'] / 1e9
    clean[n] = f"{t['clean']}/{t['calls']}"
  return {'per_size_gflops': best, 'clean_calls': clean, 'peak_gflops': max(best.values())}


def model_flops_per_token(cfg, seq_len: int) -> tuple[int, int]:
  """(matmul params N, training FLOPs per token) for the docstring's formula."""
  d, f, v, h, L = cfg.d_model, cfg.mlp_dim, cfg.vocab_size, cfg.head_dim, cfg.num_layers
  attn = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  n = L * (attn + 3 * d * f) + d * v
  # Scores and probs @ V are each 2 * T * (N * H) FLOPs per token forward.
  attn_flops = 12 * L * seq_len * cfg.num_heads * h
  return n, 6 * n + attn_flops


def random_batch(rng, batch: int, seq: int, vocab: int) -> dict:
  """A packed batch in the pipeline's format: two documents per row, the
  second followed by padding; loss on the second half of each document."""
  import numpy as np
  tokens = rng.integers(1, vocab, size=(batch, seq + 1), dtype=np.int32)
  cut, end = seq // 3, seq - seq // 8
  seg = np.zeros((batch, seq), np.int32)
  seg[:, :cut], seg[:, cut:end] = 1, 2
  pos = np.zeros((batch, seq), np.int32)
  pos[:, :cut] = np.arange(cut)
  pos[:, cut:end] = np.arange(end - cut)
  mask = np.zeros((batch, seq), np.float32)
  mask[:, cut // 2:cut] = 1.0
  mask[:, (cut + end) // 2:end] = 1.0
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': mask,
          'segment_ids': seg, 'positions': pos}


def bench_size(name: str, fields: dict, batch: int, seq: int, steps: int) -> dict:
  import jax
  import numpy as np
  from ml_collections import ConfigDict
  from configs import common
  from models.llama import ModelConfig
  from pipeline import sharding, sft
  from pipeline import state as state_lib
  from pipeline.optim import make_optimizer

  cfg = ModelConfig(vocab_size=VOCAB, **fields)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = common.DEFAULT_RULES
  spec = state_lib.model_spec(cfg, mesh, rules)
  params = state_lib.init_params(spec, seed=0)
  optim_cfg = ConfigDict(common.optim(lr=1e-3, warmup_steps=2))
  tx, schedule = make_optimizer(optim_cfg, total_steps=1000)
  state, state_shardings = state_lib.init_train_state(spec, params, tx, mesh, seed=0)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step_fn = sft.jit_train_step(spec, tx, schedule, 1, state_shardings, batch_sharding)

  rng = np.random.default_rng(0)
  batches = [sharding.shard_batch(random_batch(rng, batch, seq, VOCAB), batch_sharding)
             for _ in range(2)]
  t0 = time.perf_counter()
  state, metrics = step_fn(state, batches[0])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  state, metrics = step_fn(state, batches[1])  # one more warm-up step
  jax.block_until_ready(metrics)
  def one_step():
    nonlocal state, metrics
    state, metrics = step_fn(state, batches[one_step.calls % 2])
    jax.block_until_ready(metrics)
    one_step.calls += 1
  one_step.calls = 0
  t = timed(one_step, steps)
  if not np.isfinite(float(metrics['loss'])):
    raise RuntimeError(f'{name}: non-finite loss {metrics["loss"]}')
  step_s = t['best_s']
  n_matmul, flops_per_token = model_flops_per_token(cfg, seq)
  tokens = batch * seq
  return {'model': name, 'params': cfg.num_params(), 'matmul_params': n_matmul,
          'batch': batch, 'seq': seq, 'step_ms': 1e3 * step_s,
          'step_ms_median': 1e3 * t['median_s'], 'clean_steps': f"{t['clean']}/{t['calls']}",
          'cpu_ms': 1e3 * t['cpu_s'],
          'tokens_per_s': tokens / step_s,
          'gflops': flops_per_token * tokens / step_s / 1e9,
          'compile_s': compile_s, 'loss': float(metrics['loss'])}


def bench_distill(batch: int, seq: int, steps: int, pairs_per_step: int = 8) -> list[dict]:
  """tokens/s of the distillation step next to what it is made of.

  Rows (the default config's models, random weights, a 1-device mesh):
  the student's SFT step, the teacher's forward pass alone, the distill step
  with CE + logit KL + hidden MSE, and the same plus the preference level
  (pairs_per_step pairs of `seq` tokens, chosen and rejected). tokens/s counts
  the main batch's batch x seq tokens only, so the rows compare directly.
  """
  import functools
  import jax
  import numpy as np
  from ml_collections import ConfigDict
  from configs import common, default
  from losses.distill import uniform_layer_map
  from models.llama import ModelConfig
  from pipeline import distill, sharding, sft
  from pipeline import state as state_lib
  from pipeline.optim import make_optimizer

  models = default.get_config().models
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = common.DEFAULT_RULES
  specs = {name: state_lib.model_spec(ModelConfig(vocab_size=VOCAB, **models[name].to_dict()),
                                      mesh, rules) for name in ('student', 'teacher')}
  params = {name: state_lib.init_params(spec, seed=0) for name, spec in specs.items()}
  tx, schedule = make_optimizer(ConfigDict(common.optim(lr=1e-3, warmup_steps=2)), 1000)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  rng = np.random.default_rng(0)
  batch_size = batch
  batch = sharding.shard_batch(random_batch(rng, batch_size, seq, VOCAB), batch_sharding)

  def pairs(count):
    rows = {}
    for side in ('chosen', 'rejected'):
      b = random_batch(rng, count, seq, VOCAB)
      rows.update({f'{side}_{k}': b[k] for k in ('inputs', 'targets', 'positions')})
      rows[f'{side}_mask'] = b['loss_mask']
      rows[f'ref_{side}'] = np.full((count,), -50.0, np.float32)
    return sharding.shard_batch(rows, batch_sharding)

  student, teacher = specs['student'], specs['teacher']
  fresh_student = lambda: jax.tree.map(lambda x: x.copy(), params['student'])  # steps donate
  rows = []

  def add(name, fn, spec):
    out = fn()
    jax.block_until_ready(out)
    t = timed(lambda: jax.block_until_ready(fn()), steps)
    rows.append({'row': name, 'params': spec.config.num_params(), 'batch': batch_size,
                 'seq': seq, 'step_ms': 1e3 * t['best_s'], 'cpu_ms': 1e3 * t['cpu_s'],
                 'clean_steps': f"{t['clean']}/{t['calls']}",
                 'tokens_per_s': batch_size * seq / t['best_s']})
    print(f"{name}: {rows[-1]['step_ms']:.1f} ms", flush=True)

  state, shardings = state_lib.init_train_state(student, fresh_student(), tx, mesh, 0)
  sft_step = sft.jit_train_step(student, tx, schedule, 1, shardings, batch_sharding)
  holder = {'state': state}

  def run_sft():
    holder['state'], metrics = sft_step(holder['state'], batch)
    return metrics
  add('student SFT step', run_sft, student)

  forward = jax.jit(lambda p, b: state_lib.merge(teacher, p)(
      b['inputs'], b['positions'], b['segment_ids']).logits)
  add('teacher forward', lambda: forward(params['teacher'], batch), teacher)

  for name, pref_weight in (('distill step: CE + logit + hidden', 0.0),
                            (f'distill step: + preference ({pairs_per_step} pairs)', 0.5)):
    loss_cfg = distill.LossConfig(
        ce_weight=1.0, logit_weight=1.0, hidden_weight=0.1, preference_weight=pref_weight,
        temperature=1.0, direction='forward', jsd_beta=0.5, top_k=0, hidden_kind='mse',
        layer_map=uniform_layer_map(student.config.num_layers, teacher.config.num_layers), dpo_beta=0.1,
        pref_kl_weight=1.0)
    projection = np.tile(np.eye(student.config.d_model, teacher.config.d_model, dtype=np.float32),
                         (len(loss_cfg.layer_map), 1, 1))
    state, shardings = state_lib.init_train_state(student, fresh_student(), tx, mesh, 0,
                                                  extras={'projection': projection})
    step = jax.jit(functools.partial(distill.train_step, student=student, teacher=teacher,
                                     tx=tx, schedule=schedule, loss_cfg=loss_cfg),
                   donate_argnums=0)
    step_pairs = pairs(pairs_per_step if pref_weight else 1)
    holder['state'] = state

    def run_distill():
      holder['state'], metrics = step(holder['state'], params['teacher'], batch, step_pairs)
      return metrics
    add(name, run_distill, student)
  return rows


def format_distill_table(rows: list[dict]) -> str:
  lines = ['| row | params | batch x seq | step ms | tokens/s | CPU ms | clean steps |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f"| {r['row']} | {r['params'] / 1e6:.2f}M | {r['batch']} x {r['seq']} "
                 f"| {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['cpu_ms']:.0f} "
                 f"| {r['clean_steps']} |")
  return '\n'.join(lines)


def format_table(rows: list[dict], peak: float | None) -> str:
  lines = ['| model | params | batch x seq | step ms | tokens/s | GFLOP/s | MFU '
           '| CPU ms | MFU per CPU-s | clean steps |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    mfu = f"{100 * r['gflops'] / peak:.0f}%" if peak else 'n/a'
    cpu_mfu = f"{100 * r['cpu_mfu']:.0f}%" if peak else 'n/a'
    lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} x {r['seq']} "
                 f"| {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['gflops']:.1f} "
                 f"| {mfu} | {r['cpu_ms']:.0f} | {cpu_mfu} | {r['clean_steps']} |")
  return '\n'.join(lines)


def _malloc_hugepages_reexec() -> None:
  """Restarts this process with glibc's transparent-huge-page malloc tunable.

  glibc reads GLIBC_TUNABLES only when a process starts, hence the exec.
  """
  tunable = 'glibc.malloc.hugetlb=1'
  current = os.environ.get('GLIBC_TUNABLES', '')
  if tunable in current:
    return
  env = dict(os.environ, GLIBC_TUNABLES=':'.join(filter(None, [current, tunable])))
  os.execve(sys.executable, [sys.executable, '-m', __spec__.name, *sys.argv[1:]], env)


def main(argv):
  del argv
  if _HUGEPAGES.value:
    _malloc_hugepages_reexec()
  import jax
  sizes = QUICK_SIZES if _QUICK.value else {k: SIZES[k] for k in _SIZES.value}
  unknown = set(_SIZES.value) - set(SIZES)
  if unknown:
    raise ValueError(f'--sizes: unknown {sorted(unknown)}; valid: {sorted(SIZES)}')
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}, '
        f'{os.cpu_count()} cores, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}, '
        f'GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r}')
  peak = None
  result = {}
  if _PEAK.value:
    result['matmul'] = matmul_peak((512, 1024) if _QUICK.value else (1024, 1536, 2048))
    peak = result['matmul']['peak_gflops']
    print('float32 matmul GFLOP/s:', {n: round(g, 1) for n, g in
                                      result['matmul']['per_size_gflops'].items()},
          'clean calls:', result['matmul']['clean_calls'])
    if all(c.startswith('0/') for c in result['matmul']['clean_calls'].values()):
      print('WARNING: every matmul timing shared the CPU with other processes, so the '
            'peak (and MFU) is unreliable: re-run on an idle host or pass --peak_gflops.')
  if _PEAK_GFLOPS.value:
    peak = _PEAK_GFLOPS.value
  rows = []
  for name, (fields, batch, seq) in sizes.items():
    default_steps = {'30m': 4, '5m': 8}.get(name, 8)
    steps = 2 if _QUICK.value else (_STEPS.value or default_steps)
    row = bench_size(name, fields, batch, seq, steps)
    if peak:
      row['mfu'] = row['gflops'] / peak
      # Model FLOPs per CPU-second of this process against one core's share
      # of the peak: robust to other processes on the host (they slow the
      # wall clock, not the CPU time this step needs).
      flops = row['gflops'] * row['step_ms'] / 1e3
      row['cpu_mfu'] = flops / (row['cpu_ms'] / 1e3) / (peak / os.cpu_count())
    rows.append(row)
    print(f"{name}: {row['step_ms']:.1f} ms/step, {row['cpu_ms']:.0f} CPU ms/step "
          f"(compile {row['compile_s']:.1f} s)", flush=True)
  table = format_table(rows, peak)
  print(table)
  if _DISTILL.value:
    batch, seq = (4, 64) if _QUICK.value else (16, 256)
    result['distill_rows'] = bench_distill(batch, seq, 2 if _QUICK.value else 6)
    result['distill_table'] = format_distill_table(result['distill_rows'])
    print(result['distill_table'])
  result.update(peak_gflops_used=peak, rows=rows, table=table, xla_flags=os.environ.get('XLA_FLAGS', ''),
                glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''),
                flops_formula='6*N_matmul + 12*L*T*D per token, full T (not causal T/2)')
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value, 'w') as f:
    json.dump(result, f, indent=1)
  print('wrote', _OUT.value)


if __name__ == '__main__':
  app.run(main)
