"""The pipeline's stages starting from local Hugging Face checkpoints.

  # One model (Llama / Qwen2 / Qwen3): SFT stages, then RL and the reward model on it.
  python -m pipeline.main --config=configs/hf_example.py:/ckpt/Qwen2.5-1.5B-Instruct \\
      --workdir=runs/qwen
  # Teacher and student sharing a tokenizer: the whole recipe, distillation included.
  python -m pipeline.main \\
      --config=configs/hf_example.py:/ckpt/Qwen2.5-7B-Instruct,student=/ckpt/Qwen2.5-0.5B-Instruct \\
      --workdir=runs/qwen_distill
  # A few steps of everything, for tests: append ',tiny'.

The argument is the checkpoint path, then optional `student=PATH` and `tiny`,
comma separated. Each checkpoint folder holds config.json, *.safetensors and
tokenizer.json with a chat template (tokenizer_config.json or
chat_template.jinja). The run uses that tokenizer and template (no
sentencepiece training); the models' shapes come from config.json; the first
stage of each model starts from its checkpoint's weights (converted once to
`workdir/hf_init/<model>/final`). Export a stage with
`python -m pipeline.export_hf --workdir=... --stage=... --out=...`.

Memory: params and AdamW state are float32, 16 bytes per trained parameter,
FSDP-sharded over the mesh (compute is bfloat16 with remat here). A 1.5B
policy (24 GB) trains on one 80 GB GPU; SFT of a 7B teacher (112 GB) needs
several GPUs or a TPU slice (the default mesh (1,-1,1) shards over all of
them). What a run should reach depends on the checkpoint: the held-out suite
is measured before the first stage (the `untrained` row of summary.json).
"""

from ml_collections import ConfigDict

from configs import common
from configs.default import MATH_TASKS, STEM_TASKS


def _parse(arg: str | None) -> tuple[str, str, bool]:
  if not arg:
    raise ValueError('configs/hf_example.py needs a checkpoint path: '
                     '--config=configs/hf_example.py:/path/to/checkpoint[,student=PATH][,tiny]')
  parts = arg.split(',')
  teacher, student, tiny = parts[0], '', False
  for part in parts[1:]:
    if part == 'tiny':
      tiny = True
    elif part.startswith('student='):
      student = part[len('student='):]
    else:
      raise ValueError(f'configs/hf_example.py: unknown option {part!r} in {arg!r}; '
                       "expected 'student=PATH' or 'tiny'")
  return teacher, student, tiny


def _hf_model(path: str, tiny: bool) -> ConfigDict:
  # Shapes come from the checkpoint; only numerics are set here.
  return ConfigDict(dict(hf_checkpoint=path, dtype='float32' if tiny else 'bfloat16',
                         remat=not tiny))


def get_config(arg: str | None = None):
  teacher_path, student_path, tiny = _parse(arg)
  config = common.base()
  config.models.teacher = _hf_model(teacher_path, tiny)
  if student_path:
    config.models.student = _hf_model(student_path, tiny)
  policy = 'student' if student_path else 'teacher'
  if tiny:
    steps, batch, seq_len, n_train, n_eval, lr = 2, 8, 128, 48, 4, 1e-3
    max_new, rl_steps, filter_k, filter_candidates = 8, 1, 2, 4
    rl_shape = dict(prompts_per_step=2, group_size=4, seq_len=128)
  else:
    steps, batch, seq_len, n_train, n_eval, lr = 300, 32, 1024, 3000, 40, 1e-5
    max_new, rl_steps, filter_k, filter_candidates = 512, 100, 16, 256
    rl_shape = dict(prompts_per_step=8, group_size=8, seq_len=1536)
  source = common.source
  cold_start = {
      'math': source('reasoning_gym', weight=0.5, train_size=n_train, eval_size=n_eval,
                     task_names=MATH_TASKS, levels=(0, 1)),
      'stem': source('reasoning_gym', weight=0.3, train_size=n_train, eval_size=n_eval,
                     task_names=STEM_TASKS, levels=(0, 1)),
      'code': source('code_tasks', weight=0.2, train_size=n_train, eval_size=n_eval,
                     levels=(0, 1)),
  }
  overall = {
      'reasoning': source('reasoning_gym', weight=0.4, train_size=n_train, eval_size=n_eval,
                          task_names=MATH_TASKS + STEM_TASKS, levels=(0, 1, 2)),
      'chat': source('chat', weight=0.3, train_size=n_train, eval_size=n_eval),
      'agent': source('agent', weight=0.2, train_size=min(n_train, 470), eval_size=n_eval),
      'code': source('code_tasks', weight=0.1, train_size=n_train, eval_size=n_eval,
                     levels=(0, 1, 2)),
  }
  reasoning = {'reasoning': overall['reasoning']}
  stages = [
      common.sft_stage('cold_start_sft', model='teacher', steps=steps, batch_size=batch,
                       seq_len=seq_len, sources=cold_start, lr=lr, eval_max_new_tokens=max_new),
      common.sft_stage('overall_sft', model='teacher', steps=steps, batch_size=batch,
                       seq_len=seq_len, sources=overall, lr=lr, eval_max_new_tokens=max_new),
  ]
  if student_path:
    # The student starts from its own checkpoint ('previous' = its weights
    # before any stage trained it); the teacher is overall_sft's result.
    stages.append(common.distill_stage(
        'distill', model='student', teacher='teacher', steps=steps, batch_size=batch,
        seq_len=seq_len, sources={**reasoning, 'code': overall['code']}, lr=lr,
        init_from='previous', num_pair_prompts=4 if tiny else 256,
        eval_max_new_tokens=max_new))
  rl = dict(max_new_tokens=max_new, filter_k=filter_k, filter_candidates=filter_candidates,
            lr=lr / 10, **rl_shape)
  stages += [
      common.grpo_stage('rl_stem', model=policy, steps=rl_steps, sources=reasoning,
                        rewards={'stem': 1.0, 'format': 0.1, 'overlong': 0.1}, **rl),
      common.grpo_stage('rl_code', model=policy, steps=rl_steps,
                        sources={'code': overall['code']},
                        rewards={'code': 1.0, 'format': 0.1, 'overlong': 0.1}, **rl),
      common.reward_model_stage('reward_model', model=policy, steps=max(steps // 2, 1),
                                batch_size=batch, seq_len=seq_len // 2, lr=lr,
                                sources={'chat': overall['chat'], **reasoning}),
      common.grpo_stage('rl_preference', model=policy, steps=max(rl_steps // 2, 1),
                        sources={'chat': overall['chat']}, rewards={'preference': 1.0},
                        reward_model='reward_model', **rl),
  ]
  config.stages = stages
  config.stages[-1].filter.enabled = False  # preference is not verifiable
  if tiny:
    for stage in config.stages:
      stage.eval.batch_size = 8
      if 'filter' in stage:
        stage.filter.low = 0.0  # a random model solves nothing: keep every prompt
  return common.lock(config)
