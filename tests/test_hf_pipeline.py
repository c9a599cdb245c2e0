"""configs/hf_example.py end to end on small random local checkpoints (a Qwen2
teacher, a Qwen3 student, one tokenizer and chat template), then
pipeline.export_hf -> transformers gives our logits."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import hf_example
from data.hf_tokenizer import HFTokenizer
from hf_fixtures import write_tokenizer
from pipeline import checkpoint, export_hf, runner, sharding
from pipeline import state as state_lib
from test_hf_model import TOL, hf_logits, make_hf_model

VOCAB = 400  # the fixture tokenizer's size


def make_checkpoint(path, family, **kwargs) -> str:
  model = make_hf_model(family, vocab_size=VOCAB, **kwargs)
  model.save_pretrained(path)
  write_tokenizer(str(path), 'qwen2', vocab_size=VOCAB)
  return str(path)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf_run')
  teacher = make_checkpoint(root / 'teacher', 'qwen2', hidden_size=32, num_attention_heads=4,
                            num_key_value_heads=2)
  student = make_checkpoint(root / 'student', 'qwen3', hidden_size=16, intermediate_size=32,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                            num_hidden_layers=1, tie_word_embeddings=True)
  config = hf_example.get_config(f'{teacher},student={student},tiny')
  workdir = str(root / 'work')
  summary = runner.run_pipeline(config, workdir)
  return dict(teacher=teacher, student=student, config=config, workdir=workdir,
              summary=summary)


def test_all_stages_run_from_the_checkpoints(run):
  stages = run['summary']['stages']
  assert [s['name'] for s in stages] == ['cold_start_sft', 'overall_sft', 'distill', 'rl_stem',
                                         'rl_code', 'reward_model', 'rl_preference']
  assert all(s['status'] == 'done' for s in stages), stages
  workdir = run['workdir']
  # The run uses the checkpoint's tokenizer and template, not a sentencepiece one.
  assert not os.path.exists(os.path.join(workdir, 'tokenizer', 'tokenizer.model'))
  tok = runner.load_tokenizer(os.path.join(workdir, 'tokenizer'))
  assert isinstance(tok, HFTokenizer) and tok.end_token == '<|im_end|>'
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['untrained']['model'] == 'teacher'


def test_first_stage_started_from_the_checkpoint_weights(run):
  """hf_init/<model>/final holds the imported weights; the teacher's first
  SFT stage moved away from them, the student's distill stage too."""
  workdir = run['workdir']
  mesh = sharding.make_mesh((1, 8, 1))
  models = runner.model_configs(run['config'], VOCAB)
  for model, first_stage in (('teacher', 'cold_start_sft'), ('student', 'distill')):
    spec = state_lib.model_spec(models[model], mesh, tuple(run['config'].mesh.rules))
    like = state_lib.abstract_params(spec)
    with jax.set_mesh(mesh):
      imported = checkpoint.load_params(os.path.join(workdir, 'hf_init', model, 'final'), like)
      trained = checkpoint.load_params(os.path.join(workdir, first_stage, 'final'), like)
    source = transformers.AutoModelForCausalLM.from_pretrained(run[model]).state_dict()
    np.testing.assert_array_equal(np.asarray(imported['embed_vd']),
                                  source['model.embed_tokens.weight'].numpy())
    moved = max(float(jnp.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(imported), jax.tree.leaves(trained)))
    assert 0 < moved < 1.0  # trained a little, from the checkpoint (not from scratch)


def test_export_loads_in_transformers_with_the_same_logits(run, tmp_path):
  workdir = run['workdir']
  out = export_hf.export(workdir, 'rl_preference', str(tmp_path / 'export'))
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(model).__name__ == 'Qwen3ForCausalLM'
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  ours_tok = HFTokenizer.load(out)
  messages = [{'role': 'user', 'content': 'What is 2 + 3?'}]
  text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert hf_tok(text, add_special_tokens=False)['input_ids'] == \
      ours_tok.render_prompt(messages).tolist()

  cfg = export_hf.stage_model_config(os.path.join(workdir, 'rl_preference'))
  mesh = sharding.make_mesh((2, 2, 2))
  spec = state_lib.model_spec(cfg, mesh, tuple(run['config'].mesh.rules))
  with jax.set_mesh(mesh):
    params = checkpoint.load_params(os.path.join(workdir, 'rl_preference', 'final'),
                                    state_lib.abstract_params(spec))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (2, 10)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 6:] = 0
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  ours = np.asarray(jax.jit(lambda p, t, pos, seg: state_lib.merge(spec, p)(t, pos, seg).logits)(
      params, tokens, positions, mask))
  theirs = hf_logits(model, tokens, mask, positions)
  real = mask.astype(bool)
  assert np.abs(ours[real] - theirs[real]).max() < TOL


def test_export_errors(run, tmp_path):
  with pytest.raises(FileNotFoundError, match='no_such_stage/final does not exist'):
    export_hf.export(run['workdir'], 'no_such_stage', str(tmp_path / 'x'))


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match='needs a checkpoint path'):
    hf_example.get_config('')
  with pytest.raises(ValueError, match="unknown option 'small'"):
    hf_example.get_config('/x,small')
  config = hf_example.get_config(f'{tmp_path}/missing,tiny')
  with pytest.raises(FileNotFoundError, match='missing is not a Hugging Face checkpoint'):
    runner.validate(config)
