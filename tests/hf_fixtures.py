"""Small local stand-ins for Hugging Face checkpoints' tokenizers (no hub here):
a byte-level BPE trained with `tokenizers` on a few sentences, plus chat
templates of the three supported families, written after the published
ones (Llama 3 Instruct; Qwen2.5 Instruct with its default system prompt and
tool turns; Qwen3 with <think> handling and the last-query rule)."""

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

QWEN2_TEMPLATE = """{%- for message in messages %}
    {%- if loop.first and message.role != 'system' %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {%- if message.role == "tool" %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or message.role == "system" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in message.content %}
            {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
            {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

FAMILIES = {
    'llama': dict(template=LLAMA3_TEMPLATE,
                  specials=['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>',
                            '<|end_header_id|>', '<|eot_id|>'],
                  bos='<|begin_of_text|>', eos='<|eot_id|>', pad=None, end='<|eot_id|>'),
    'qwen2': dict(template=QWEN2_TEMPLATE,
                  specials=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                  bos=None, eos='<|im_end|>', pad='<|endoftext|>', end='<|im_end|>'),
    'qwen3': dict(template=QWEN3_TEMPLATE,
                  specials=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                  bos=None, eos='<|im_end|>', pad='<|endoftext|>', end='<|im_end|>'),
}

CORPUS = [
    'What is 2 + 3? The answer is 5.', 'Hello there, how are you today?',
    'def add(a, b):\n    return a + b\n', '<think>step by step</think><answer>42</answer>',
    'You are a helpful assistant.', 'The quick brown fox jumps over the lazy dog.',
    '{"name": "get_weather", "arguments": {"city": "Paris"}}', 'tool_response system user',
] * 4


def write_tokenizer(path: str, family: str, vocab_size: int = 400) -> str:
  """tokenizer.json + tokenizer_config.json (with the family's chat template)."""
  spec = FAMILIES[family]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec['specials'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, 'tokenizer.json'))
  config = {'chat_template': spec['template'], 'bos_token': spec['bos'],
            'eos_token': spec['eos'], 'pad_token': spec['pad'],
            'tokenizer_class': 'PreTrainedTokenizerFast'}
  with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  return path
