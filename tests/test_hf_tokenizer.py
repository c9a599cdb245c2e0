"""data/hf_tokenizer.py: a checkpoint's tokenizer.json and chat template through
data/chat.py, with assistant-only loss masks, on the templates of the three
supported families; checked against transformers' apply_chat_template."""

import json
import os

import numpy as np
import pytest
import transformers

from data import chat
from data.hf_tokenizer import HFTokenizer
from hf_fixtures import FAMILIES, write_tokenizer

CHAT = [
    {'role': 'system', 'content': 'You are a helpful assistant.'},
    {'role': 'user', 'content': 'What is 2 + 3?'},
    {'role': 'assistant', 'content': '<think>2 + 3 = 5</think><answer>5</answer>'},
    {'role': 'user', 'content': 'And the weather in Paris?'},
    {'role': 'assistant', 'content': '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
    {'role': 'tool', 'content': '{"temp": 21}'},
    {'role': 'assistant', 'content': 'It is 21 degrees.'},
]


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def family_tok(request, tmp_path_factory):
  path = write_tokenizer(str(tmp_path_factory.mktemp(request.param)), request.param)
  return request.param, path, HFTokenizer.load(path)


def test_matches_transformers_apply_chat_template(family_tok):
  family, path, tok = family_tok
  reference = transformers.PreTrainedTokenizerFast.from_pretrained(path)
  for messages in (CHAT, CHAT[1:3], CHAT[:2]):
    want = reference.apply_chat_template(messages, tokenize=False)
    assert tok.template_text(messages) == want
    prompt = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.template_text(messages, add_generation_prompt=True) == prompt
    # Encoding piece by piece at the mask boundaries gives the whole text's ids.
    ids, _ = chat.render_chat(messages, tok)
    assert ids.tolist() == reference(want, add_special_tokens=False)['input_ids']
    np.testing.assert_array_equal(
        chat.render_prompt(messages, tok), reference(prompt, add_special_tokens=False)['input_ids'])


def test_mask_is_assistant_replies_and_their_end_token(family_tok):
  family, _, tok = family_tok
  end = FAMILIES[family]['end']
  assert tok.end_token == end and tok.encode(end) == [tok.end_id]
  ids, mask = chat.render_chat(CHAT, tok)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
  # Split the masked tokens into runs: one per assistant turn, each ending in
  # the end-of-turn token.
  runs, current = [], []
  for i, m in zip(ids.tolist(), mask.tolist()):
    if m:
      current.append(i)
    elif current:
      runs.append(current)
      current = []
  if current:
    runs.append(current)
  replies = [m['content'] for m in CHAT if m['role'] == 'assistant']
  assert len(runs) == len(replies)
  for run, reply in zip(runs, replies):
    assert run[-1] == tok.end_id and tok.end_id not in run[:-1]
    text = tok.decode(run[:-1])
    # The reply as the template writes it: Llama trims, Qwen3 moves the
    # think block of earlier turns out of the history.
    final = reply.split('</think>')[-1]
    assert final in text, (family, text)
  # Nothing else is masked: no header, no user or tool text, no system prompt.
  unmasked = tok.decode(ids[~mask])
  for message in CHAT:
    if message['role'] != 'assistant':
      assert message['content'] in unmasked
  assert 'It is 21 degrees' not in unmasked
  # Qwen3 keeps the reasoning of turns after the last user query only.
  if family == 'qwen3':
    assert '2 + 3 = 5' not in tok.decode(ids)
  else:
    assert '2 + 3 = 5' in tok.decode(ids[mask])


def test_prompt_then_reply_is_the_chat(family_tok):
  """What the sampler is given plus what it should write (reply + end token)
  is exactly the rendered single-turn chat, with the mask on the reply."""
  family, _, tok = family_tok
  messages = CHAT[:3]
  prompt = chat.render_prompt(messages[:-1], tok)
  ids, mask = chat.render_chat(messages, tok)
  np.testing.assert_array_equal(ids[:len(prompt)], prompt)
  stop = len(prompt) + ids[len(prompt):].tolist().index(tok.end_id) + 1
  assert not mask[:len(prompt)].any() and mask[len(prompt):stop].all()
  assert not mask[stop:].any()  # Qwen's '\n' after <|im_end|>: template, not reply


def test_interface(family_tok, tmp_path):
  family, path, tok = family_tok
  assert tok.vocab_size == 400
  text = 'Hello there, 2 + 3 = 5!'
  assert tok.decode(tok.encode(text)) == text
  pad = FAMILIES[family]['pad']
  assert tok.pad_id == (tok.encode(pad)[0] if pad else tok.end_id)
  copy = str(tmp_path / 'copy')
  tok.save(copy)
  again = HFTokenizer.load(copy)
  assert again.fingerprint() == tok.fingerprint()
  np.testing.assert_array_equal(chat.render_chat(CHAT, again)[0], chat.render_chat(CHAT, tok)[0])


def test_vocab_size_follows_the_padded_embedding(tmp_path):
  path = write_tokenizer(str(tmp_path), 'qwen2')
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'vocab_size': 512}, f)
  assert HFTokenizer.load(path).vocab_size == 512


def test_template_in_its_own_file_and_errors(tmp_path):
  path = write_tokenizer(str(tmp_path / 'a'), 'qwen2')
  config_file = os.path.join(path, 'tokenizer_config.json')
  with open(config_file) as f:
    config = json.load(f)
  template = config.pop('chat_template')
  with open(config_file, 'w') as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match='no chat template'):
    HFTokenizer.load(path)
  with open(os.path.join(path, 'chat_template.jinja'), 'w') as f:
    f.write(template)  # transformers >= 4.50 saves the template here
  assert HFTokenizer.load(path).end_token == '<|im_end|>'
  with pytest.raises(ValueError, match=r"record 'r7', message 1: role 'robot'"):
    chat.render_chat([{'role': 'user', 'content': 'x'}, {'role': 'robot', 'content': 'y'}],
                     HFTokenizer.load(path), record_id='r7')
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    HFTokenizer.load(str(tmp_path))
