"""models/hf.py against transformers (torch, float32): logits parity on random
token batches with padding, exact export/import round trips, sharded loading,
and clear errors on what we cannot represent."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from configs.common import DEFAULT_RULES
from models import hf
from pipeline import sharding
from pipeline import state as state_lib

TOL = 1e-4  # max abs logit error, float32; never loosen

# family, config kwargs (small shapes covering GQA ratios, tying, bias, q/k norm)
CASES = {
    'llama_gqa2_untied': ('llama', dict(num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False)),
    'llama_mha_tied_h16': ('llama', dict(num_attention_heads=4, num_key_value_heads=4,
                                         head_dim=16, tie_word_embeddings=True,
                                         rope_theta=500_000.0)),
    # Llama 3.1 rope scaling; the original context is set so that the head's 4
    # frequencies fall in all three bands (kept, interpolated, stretched).
    'llama_rope_llama3': ('llama', dict(num_attention_heads=4, num_key_value_heads=1,
                                        max_position_embeddings=16384,
                                        rope_parameters=dict(
                                            rope_type='llama3', rope_theta=500_000.0,
                                            factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=16.0,
                                            original_max_position_embeddings=2048))),
    'qwen2_rope_linear': ('qwen2', dict(num_attention_heads=4, num_key_value_heads=2,
                                        rope_parameters=dict(rope_type='linear',
                                                             rope_theta=1e4, factor=4.0))),
    'qwen2_gqa3_tied': ('qwen2', dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                      tie_word_embeddings=True, rope_theta=1e6)),
    'qwen2_mqa_untied': ('qwen2', dict(num_attention_heads=4, num_key_value_heads=1,
                                       tie_word_embeddings=False)),
    'qwen3_gqa2_untied_h16': ('qwen3', dict(num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=16, tie_word_embeddings=False)),
    'qwen3_mha_tied': ('qwen3', dict(num_attention_heads=4, num_key_value_heads=4,
                                     head_dim=8, tie_word_embeddings=True)),
}
CLASSES = {'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           'qwen3': (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}
VOCAB = 97


def make_hf_model(family: str, seed: int = 0, **kwargs):
  """A small random HF model; every weight (norm scales and biases too) random,
  so that a mapping mistake anywhere changes the logits."""
  config_cls, model_cls = CLASSES[family]
  kwargs = {'vocab_size': VOCAB, 'hidden_size': 32, 'intermediate_size': 48,
            'num_hidden_layers': 2, 'rms_norm_eps': 1e-6, **kwargs}
  torch.manual_seed(seed)
  model = model_cls(config_cls(**kwargs)).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model


def save_hf(model, path, **kwargs) -> str:
  model.save_pretrained(path, **kwargs)
  return str(path)


def batch(seed: int = 0, b: int = 4, t: int = 12):
  """Random tokens; row 1 right-padded, row 2 left-padded, row 3 one token."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[1, -4:] = 0
  mask[2, :5] = 0
  mask[3, 1:] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def hf_logits(model, tokens, mask, positions) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens).long(),
                attention_mask=torch.from_numpy(mask).long(),
                position_ids=torch.from_numpy(positions).long())
  return out.logits.float().numpy()


def import_model(path, mesh_shape=(2, 2, 2), **overrides):
  """Our config, spec and params for the checkpoint, on a mesh."""
  mesh = sharding.make_mesh(mesh_shape)
  cfg = hf.model_config(path, **overrides)
  spec = state_lib.model_spec(cfg, mesh, DEFAULT_RULES)
  with jax.set_mesh(mesh):
    params = hf.load_params(path, cfg, spec.param_shardings)
  return mesh, spec, params


def our_logits(spec, params, tokens, mask, positions) -> np.ndarray:
  @jax.jit
  def forward(params, tokens, positions, segments):
    return state_lib.merge(spec, params)(tokens, positions, segments).logits
  return np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(positions),
                            jnp.asarray(mask)))


@pytest.mark.parametrize('case', sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
  family, kwargs = CASES[case]
  model = make_hf_model(family, **kwargs)
  path = save_hf(model, tmp_path / 'ckpt')
  mesh, spec, params = import_model(path)
  tokens, mask, positions = batch()
  ours = our_logits(spec, params, tokens, mask, positions)
  theirs = hf_logits(model, tokens, mask, positions)
  real = mask.astype(bool)
  err = float(np.max(np.abs(ours[real] - theirs[real])))
  print(f'{case}: max abs logit error {err:.2e} (logit scale {np.abs(theirs).max():.1f})')
  assert err < TOL, (case, err)
  # Each parameter sits on the sharding the model spec asked for.
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(spec.param_shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim)


def test_scan_layers(tmp_path):
  """scan_layers=True ([L, ...] params): same logits, and the export equals
  the unscanned one's tensor for tensor."""
  model = make_hf_model('qwen3', num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        num_hidden_layers=3)
  path = save_hf(model, tmp_path / 'ckpt')
  _, spec, params = import_model(path, scan_layers=True)
  assert params['blocks']['attn']['wq_dnh'].shape == (3, 32, 4, 8)
  tokens, mask, positions = batch(5)
  real = mask.astype(bool)
  err = np.abs(our_logits(spec, params, tokens, mask, positions)[real]
               - hf_logits(model, tokens, mask, positions)[real]).max()
  assert err < TOL
  _, flat_spec, flat_params = import_model(path)
  scanned = dict(hf.export_tensors(params, spec.config))
  flat = dict(hf.export_tensors(flat_params, flat_spec.config))
  assert scanned.keys() == flat.keys() == set(model.state_dict()) - {'lm_head.weight'} | (
      {'lm_head.weight'} if not model.config.tie_word_embeddings else set())
  for name in flat:
    np.testing.assert_array_equal(scanned[name], flat[name])


def test_config_mapping(tmp_path):
  model = make_hf_model('qwen3', num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        tie_word_embeddings=False, rope_theta=1e6)
  cfg = hf.model_config(save_hf(model, tmp_path / 'q3'), dtype='bfloat16')
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim, cfg.mlp_dim) == (VOCAB, 32, 2, 4, 2, 16, 48)
  assert cfg.qk_norm and not cfg.qkv_bias and not cfg.tie_embeddings
  assert cfg.rope_theta == 1e6 and cfg.rope_scaling == 'none' and cfg.dtype == 'bfloat16'
  family, kwargs = CASES['llama_rope_llama3']
  cfg = hf.model_config(save_hf(make_hf_model(family, **kwargs), tmp_path / 'l3'))
  assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
          cfg.rope_original_max_len, cfg.rope_theta) == ('llama3', 8.0, 1.0, 16.0, 2048, 5e5)
  with pytest.raises(ValueError, match='num_heads=8 disagrees'):
    hf.model_config(str(tmp_path / 'q3'), num_heads=8)


def test_reads_only_each_devices_slice(tmp_path, monkeypatch):
  """On a mesh that shards the weights, no callback reads a whole sharded tensor."""
  model = make_hf_model('llama', num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=64, vocab_size=96, tie_word_embeddings=False)
  path = save_hf(model, tmp_path / 'ckpt')
  reads = []
  original = hf._read_shard

  def spy(tensor, layout, index):
    out = original(tensor, layout, index)
    reads.append((layout.hf_name, out.size, int(np.prod(layout.hf_shape))))
    return out
  monkeypatch.setattr(hf, '_read_shard', spy)
  mesh, spec, params = import_model(path, mesh_shape=(1, 2, 4))
  big = [r for r in reads if r[0].endswith(('q_proj.weight', 'gate_proj.weight',
                                            'down_proj.weight', 'lm_head.weight',
                                            'embed_tokens.weight'))]
  assert big and all(size <= whole // 8 for _, size, whole in big), big[:4]


def test_sharded_checkpoint_with_index(tmp_path):
  model = make_hf_model('qwen2', num_attention_heads=4, num_key_value_heads=2)
  path = save_hf(model, tmp_path / 'ckpt', max_shard_size='20KB')
  assert os.path.exists(os.path.join(path, hf.INDEX_FILE))
  assert len([f for f in os.listdir(path) if f.endswith('.safetensors')]) > 1
  mesh, spec, params = import_model(path)
  tokens, mask, positions = batch(1)
  real = mask.astype(bool)
  err = np.abs(our_logits(spec, params, tokens, mask, positions)[real]
               - hf_logits(model, tokens, mask, positions)[real]).max()
  assert err < TOL


def test_bfloat16_checkpoint(tmp_path):
  """Real checkpoints ship bfloat16: imported exactly (upcast), parity against
  the same bf16 weights upcast to float32 in torch (reloaded: casting the
  torch model back and forth would also round its RoPE inv_freq buffer)."""
  model = make_hf_model('qwen3', num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  path = save_hf(model.to(torch.bfloat16), tmp_path / 'bf16')
  model = transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  mesh, spec, params = import_model(path)
  tokens, mask, positions = batch(2)
  real = mask.astype(bool)
  err = np.abs(our_logits(spec, params, tokens, mask, positions)[real]
               - hf_logits(model, tokens, mask, positions)[real]).max()
  assert err < TOL


@pytest.mark.parametrize('case', ['llama_gqa2_untied', 'llama_rope_llama3', 'qwen2_rope_linear',
                                  'qwen2_gqa3_tied', 'qwen3_mha_tied'])
def test_export_transformers_import_round_trip(case, tmp_path):
  """ours -> export -> transformers from_pretrained (same logits) ->
  save_pretrained -> import: bit-identical params."""
  family, kwargs = CASES[case]
  model = make_hf_model(family, seed=3, **kwargs)
  mesh, spec, params = import_model(save_hf(model, tmp_path / 'src'))
  out = str(tmp_path / 'export')
  hf.save_pretrained(out, params, spec.config, max_shard_bytes=16_000)
  assert os.path.exists(os.path.join(out, hf.INDEX_FILE))  # sharded export
  reloaded = CLASSES[family][1].from_pretrained(out, dtype=torch.float32).eval()
  assert type(reloaded).__name__ == type(model).__name__
  for name, tensor in model.state_dict().items():
    assert torch.equal(tensor, reloaded.state_dict()[name]), name
  tokens, mask, positions = batch(4)
  real = mask.astype(bool)
  ours = our_logits(spec, params, tokens, mask, positions)
  assert np.abs(ours[real] - hf_logits(reloaded, tokens, mask, positions)[real]).max() < TOL
  again = save_hf(reloaded, tmp_path / 'again')
  _, _, params2 = import_model(again, mesh_shape=(1, 8, 1))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _edit_config(path, **changes):
  file = os.path.join(path, 'config.json')
  with open(file) as f:
    config = json.load(f)
  config.update(changes)
  with open(file, 'w') as f:
    json.dump(config, f)


@pytest.fixture(scope='module')
def llama_ckpt(tmp_path_factory):
  model = make_hf_model('llama', num_attention_heads=4, num_key_value_heads=2)
  return save_hf(model, tmp_path_factory.mktemp('llama'))


def _copy(src, tmp_path) -> str:
  dst = str(tmp_path / 'copy')
  shutil.copytree(src, dst)
  return dst


@pytest.mark.parametrize('changes, message', [
    (dict(architectures=['MistralForCausalLM']), "MistralForCausalLM"),
    (dict(architectures=['LlamaForCausalLM'], model_type='qwen2'), "model_type='qwen2'"),
    (dict(rope_parameters={'rope_type': 'dynamic', 'rope_theta': 5e5, 'factor': 8.0}),
     "rope_parameters.rope_type='dynamic'"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={'type': 'yarn', 'factor': 2}),
     "rope_scaling.rope_type='yarn'"),
    (dict(rope_parameters={'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 8.0}),
     "rope_parameters of type 'llama3' has no 'low_freq_factor'"),
    (dict(attention_bias=True), 'attention_bias=True'),
    (dict(mlp_bias=True), 'mlp_bias=True'),
    (dict(hidden_act='gelu'), "hidden_act='gelu'"),
])
def test_unsupported_config_is_a_clear_error(llama_ckpt, tmp_path, changes, message):
  path = _copy(llama_ckpt, tmp_path)
  _edit_config(path, **changes)
  with pytest.raises(ValueError, match=message.replace('[', r'\[').replace('(', r'\(')) as e:
    hf.model_config(path)
  assert 'config.json' in str(e.value)


def test_missing_and_misshapen_tensors(llama_ckpt, tmp_path):
  path = _copy(llama_ckpt, tmp_path)
  file = os.path.join(path, 'model.safetensors')
  tensors = load_file(file)
  cfg = hf.model_config(path)
  mesh = sharding.make_mesh((1, 8, 1))
  spec = state_lib.model_spec(cfg, mesh, DEFAULT_RULES)

  missing = {k: v for k, v in tensors.items() if k != 'model.layers.1.mlp.up_proj.weight'}
  save_file(missing, file, metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=r"no tensor 'model.layers.1.mlp.up_proj.weight'"):
    hf.load_params(path, cfg, spec.param_shardings)

  bad = dict(tensors, **{'model.layers.0.self_attn.k_proj.weight': np.zeros((8, 32), np.float32)})
  save_file(bad, file, metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.self_attn"
                                       r".k_proj.weight' has shape \(8, 32\)"):
    hf.load_params(path, cfg, spec.param_shardings)

  extra = dict(tensors, **{'model.layers.0.self_attn.o_proj.bias': np.zeros(32, np.float32)})
  save_file(extra, file, metadata={'format': 'pt'})
  with pytest.raises(ValueError, match='o_proj.bias'):
    hf.load_params(path, cfg, spec.param_shardings)

  os.remove(file)
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    hf.load_params(path, cfg, spec.param_shardings)
