"""RL reward functions, and a system that runs them without trusting them.

A reward function scores a batch (DESIGN.md §6):

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`columns` are per-item lists of the same length as `completions` (the full
record dicts under `records`, `truncated`, `lengths`, ...) or plain values
passed whole (`max_new_tokens=128`); every function takes `**columns` and
ignores what it does not use. None means "not applicable to this item" (the
code reward on a math prompt).

Built-in functions:
  stem_reward       1/0: the final answer of a reasoning-gym task, by the
                    task's own scorer or math-verify equivalence.
  steps_reward      1/0: every arithmetic claim of the reasoning is true.
  sound_stem_reward 1/0: both of the above (a right answer, soundly reached).
  code_reward       the pass fraction of the extracted program in the sandbox.
  agent_reward      1/0: the tool calls match an accepted answer.
  format_reward     1/0: `<think>…</think><answer>…</answer>` (tool calls for
                    agent records) and nothing after.
  overlong_penalty  a factory for DAPO's soft overlong punishment (0 .. -1).

`RewardSystem` combines weighted functions. The verifiers are the part of an
RL run most exposed to what the policy writes, so each function call is
treated as hostile to the run, not to the machine (the sandbox does that for
programs): it runs in a forked child, one item at a time under a per-item
alarm, results streamed back over a pipe, the child killed at a hard
deadline. A function that hangs, raises, crashes the interpreter or returns
garbage scores 0 on the affected items, is counted in the stats and logged
once, and the run goes on.

Usage:
  system = default_reward_system({'functions': {'stem': 1.0, 'format': 0.1},
                                  'timeout_s': 10.0})
  total, per_function, stats = system(prompts, completions, records=records,
                                      truncated=truncated, lengths=lengths)
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging as py_logging
import math
import numbers
import os
import re
import resource
import selectors
import signal
import struct
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import math_verify
import numpy as np
import reasoning_gym.factory
from absl import logging

from data.sources import agent, code_tasks, reasoning_gym_math
from pipeline import sandbox

RewardFn = Callable[..., Sequence[float | None]]

# pipeline.evaluate has the same tuple; it is not imported from there because
# that module pulls in JAX, which the reward children must never touch.
CODE_TASKS = ('code_gen', 'humaneval')
# Tool-call records (BFCL traces, generated tool-use tasks); the same in evaluate.
AGENT_TASKS = ('agent', 'tool_use')
# A reward outside this range is a bug (a logit, a token count), not a reward.
MAX_ABS_REWARD = 1e6
FAILURE_KINDS = ('timeout', 'exception', 'crash', 'garbage')


# =========================================================== STEM answers ===

# The final answer of a reasoning-gym task is short; a longer one is padding or
# an attack on the parser, and is not worth a sympy call.
_MAX_ANSWER_CHARS = 1000
_ANSWER_TAG_RE = re.compile(r'</?answer>')
_BOXED = '\\boxed{'
_THOUSANDS_RE = re.compile(r'(?<=\d),(?=\d{3}(?!\d))')
_NUMBER_RE = re.compile(r'(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?')
# Between two numbers, one of these makes them one expression ("1/2",
# "\frac{1}{2}", "2^{10}") ...
_JOINING_RE = re.compile(r'[-+*/^(){}\[\]_]|\\(?:d?t?frac|cdot|times|div|sqrt|left|right)')
# ... and one of these makes them separate candidates ("3, 4", "3 or 4", "x=3=4").
_SPLITTING_RE = re.compile(r'[,;|=\n]|\b(?:or|and)\b', re.I)
# Words that offer alternatives whatever surrounds them ("\pm 2", "x or y").
_ALTERNATIVE_RE = re.compile(r'\b(?:or|either)\b|\\pm|\\mp|\\lor|\\vee|±|∓', re.I)


def _last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{…}`; None if there is none or it never closes."""
  start = text.rfind(_BOXED)
  if start < 0:
    return None
  depth, i = 1, start + len(_BOXED)
  while i < len(text):
    ch = text[i]
    if ch == '\\':
      i += 2  # `\{` and `\}` are literal braces in LaTeX, not groups
      continue
    if ch == '{':
      depth += 1
    elif ch == '}':
      depth -= 1
      if depth == 0:
        return text[start + len(_BOXED):i]
    i += 1
  return None


def final_answer(completion: str) -> str | None:
  """The final answer: the last `<answer>…</answer>`, else the last `\\boxed{}`.

  Conservative, because the policy is optimised against it: answer tags that
  do not strictly alternate open/close (nested, unclosed, stray closing tags)
  anywhere in the completion, an unbalanced `\\boxed{`, several `\\boxed{}`
  inside the answer tags, or an empty answer all give None. A `\\boxed{}`
  inside the answer tags is unwrapped.
  """
  tags = [(m.group(), m.start(), m.end()) for m in _ANSWER_TAG_RE.finditer(completion)]
  if tags:
    opening = [t[0] == '<answer>' for t in tags]
    if len(tags) % 2 or opening != [i % 2 == 0 for i in range(len(tags))]:
      return None  # nested, unclosed or stray tags
    answer = completion[tags[-2][2]:tags[-1][1]]
    if _BOXED in answer:
      if answer.count(_BOXED) > 1:
        return None  # several boxed candidates
      answer = _last_boxed(answer)
  else:
    answer = _last_boxed(completion)
  if answer is None:
    return None
  answer = answer.strip()
  return answer or None


def _candidate_count(text: str) -> int:
  """How many separate numeric candidates `text` offers ("3, 4" -> 2, "1/2" -> 1)."""
  text = _THOUSANDS_RE.sub('', text)  # "1,000" is one number
  spans = [m.span() for m in _NUMBER_RE.finditer(text)]
  count = min(len(spans), 1)
  for (_, end), (start, _) in zip(spans, spans[1:]):
    gap = text[end:start]
    if _SPLITTING_RE.search(gap) or not _JOINING_RE.search(gap):
      count += 1
  return count


def several_candidates(answer: str, reference: str) -> bool:
  """True if `answer` hedges: more candidates than the reference has.

  The rule: alternative words ("or", "\\pm", "±") the reference does not use,
  or more separate numbers than the reference (at least one allowed), where
  numbers are separate unless an operator joins them ("1/2", "2^{10}", "-3 - 4"
  are one; "3, 4", "3 4", "3 or 4", "x = 3 = 4", "3 apples and 4" are two).
  Conservative by design: a hedge scored as a hit is a reward hack, a correct
  answer written oddly scored as a miss only costs a sample.
  """
  if _ALTERNATIVE_RE.search(answer) and not _ALTERNATIVE_RE.search(reference):
    return True
  return _candidate_count(answer) > max(_candidate_count(reference), 1)


class _DropMathVerifyTimeoutWarning(py_logging.Filter):
  # We pass timeout=None on purpose (math-verify's own timeout is
  # signal.alarm, which would cancel the child's per-item timer); its warning
  # about that would print once in every forked child.
  def filter(self, record):
    return not str(record.msg).startswith('Timeout is disabled')


for _name in ('math_verify.parser', 'math_verify.grader'):
  py_logging.getLogger(_name).addFilter(_DropMathVerifyTimeoutWarning())


@functools.lru_cache(maxsize=4096)
def _parse_reference(reference: str):
  return math_verify.parse(reference, parsing_timeout=None)


def equivalent(answer: str, reference: str) -> bool:
  """math-verify (sympy) equivalence of two answers ("0.5" vs "1/2").

  No timeout of its own: call it under a deadline (RewardSystem's isolation).
  """
  gold = _parse_reference(reference)
  pred = math_verify.parse(answer, parsing_timeout=None)
  return bool(gold) and bool(pred) and bool(math_verify.verify(gold, pred, timeout_seconds=None))


# A number written out: "-3", "0.5", "1,000", "1e-3", "1/2", "\\frac{1}{2}", "50%",
# optionally "x = " before it. Equivalence is only trusted between literals: on
# expressions, math-verify would accept a copy of the question's "5 - 3 * 2"
# as its value, and the policy would learn to copy instead of compute.
_INT = r'(?:\d{1,3}(?:,\d{3})+|\d+)'
_DECIMAL = rf'(?:{_INT}(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?'
_LITERAL_RE = re.compile(
    r'(?:[A-Za-z]\w*\s*=\s*)?[-+\u2212]?\s*'
    rf'(?:{_DECIMAL}(?:\s*/\s*{_DECIMAL})?|\\[dt]?frac\{{\s*{_INT}\s*\}}\{{\s*{_INT}\s*\}})'
    r'\s*(?:%|\\%)?')


_INTEGER_RE = re.compile(r'[-+]?\d+')


def is_number_literal(text: str) -> bool:
  """True for a plain number ("-3", "0.5", "1/2", "\\frac{1}{2}", "x = 4")."""
  text = text.strip()
  if len(text) >= 2 and text[0] == text[-1] == '$':
    text = text.strip('$').strip()
  return _LITERAL_RE.fullmatch(text) is not None


def _is_reasoning_gym(record: Mapping) -> bool:
  return record.get('task') in reasoning_gym.factory.DATASETS and 'answer' in record


def stem_reward(prompts: Sequence[str], completions: Sequence[str], *,
                records: Sequence[Mapping], **unused) -> list[float | None]:
  """1.0 when the final answer of a reasoning-gym task is right, else 0.0.

  Right means full marks from the task's own scorer
  (`reasoning_gym_math.score`, no partial credit) or, when both are number
  literals (`is_number_literal`), math-verify equivalence to the reference
  answer ("0.5" for "1/2"). Only the final answer counts (`final_answer`);
  malformed markup, empty answers and hedged answers (`several_candidates`)
  score 0. None for records that are not reasoning-gym tasks.
  """
  del prompts, unused
  out = []
  for record, completion in zip(records, completions, strict=True):
    if not _is_reasoning_gym(record):
      out.append(None)
      continue
    reference = str(record['answer']).strip()
    answer = final_answer(completion)
    if (answer is None or len(answer) > max(_MAX_ANSWER_CHARS, 4 * len(reference))
        or several_candidates(answer, reference)):
      out.append(0.0)
      continue
    # The scorer reads the last answer tags; `answer` holds no tags.
    if reasoning_gym_math.score(dict(record), f'<answer>{answer}</answer>') >= 1.0:
      out.append(1.0)
    elif (is_number_literal(answer) and is_number_literal(reference)
          and not (_INTEGER_RE.fullmatch(reference) and ('/' in answer or 'frac' in answer))):
      # An integer is not owed as a fraction: "8/2" may be the question copied.
      out.append(float(equivalent(answer, reference)))
    else:
      out.append(0.0)
  return out


# ================================================================= steps ===

def steps_reward(prompts: Sequence[str], completions: Sequence[str], *,
                 records: Sequence[Mapping], **unused) -> list[float | None]:
  """1.0 when every arithmetic claim in the reasoning (`<think>…</think>`) is
  true, 0.0 when one is false; None for records that are not reasoning-gym
  tasks and for completions that make no claim.

  An outcome reward cannot tell a worked answer from a lucky one: the 0.2M
  student's right gcd answers (1 or 2 for most items) nearly all follow a
  Euclid trace with a false step. This term tells them apart. It checks that
  the claims are true, not that they are about the question, and on its own
  it pays for fewer claims (README: "RL recipe probes").
  """
  del prompts, unused
  verdicts = [reasoning_gym_math.claims_hold(c) if _is_reasoning_gym(r) else None
              for r, c in zip(records, completions, strict=True)]
  return [None if v is None else float(v) for v in verdicts]


def sound_stem_reward(prompts: Sequence[str], completions: Sequence[str], *,
                      records: Sequence[Mapping], **unused) -> list[float | None]:
  """`stem_reward` gated by `steps_reward`: 1.0 only for a right final answer
  whose reasoning makes arithmetic claims and no false one (the held-out
  `sound_accuracy`). A guess reached through a trace that computed something
  else scores 0 here; None for records that are not reasoning-gym tasks."""
  right = stem_reward(prompts, completions, records=records)
  steps = steps_reward(prompts, completions, records=records)
  return [None if r is None else float(r >= 1.0 and s == 1.0) for r, s in zip(right, steps)]


# ================================================================== code ===

_sandbox_errors_logged = False


def make_code_reward(timeout_s: float = 5.0, max_workers: int = 4) -> RewardFn:
  """A code reward whose sandbox runs get `timeout_s` each, `max_workers` at once."""

  def code_reward(prompts: Sequence[str], completions: Sequence[str], *,
                  records: Sequence[Mapping], **unused) -> list[float | None]:
    """Pass fraction of the extracted program on `record['tests']`, in the sandbox.

    For 'code_gen' and 'humaneval' records (HumanEval's single check test
    gives 0 or 1); no extractable program scores 0; None for other records.
    """
    global _sandbox_errors_logged
    del prompts, unused
    out: list[float | None] = [None] * len(completions)
    jobs, where = [], []
    for i, (record, completion) in enumerate(zip(records, completions, strict=True)):
      if record.get('task') not in CODE_TASKS:
        continue
      program = code_tasks.extract_code(completion)
      if program is None:
        out[i] = 0.0
      else:
        jobs.append((program, list(record['tests'])))
        where.append(i)
    results = sandbox.run_many(jobs, max_workers=max_workers, timeout_s=timeout_s)
    for i, result in zip(where, results):
      out[i] = result.pass_fraction
      # 'error' is the sandbox's fault, not the program's: it scores 0 like a
      # failure, but should not go unnoticed.
      if result.status == 'error' and not _sandbox_errors_logged:
        _sandbox_errors_logged = True
        logging.warning('code_reward: the sandbox could not run a program (%s); it scores 0. '
                        'Logged once.', result.reason)
    return out

  return code_reward


code_reward = make_code_reward()


# ========================================================= agent, format ===

def _score_calls(record: Mapping, completion: str) -> float:
  try:
    return agent.score_calls(dict(record), completion)
  except RecursionError:
    return 0.0  # JSON nested past the interpreter's limit is malformed output


def _parse_tool_calls(text: str) -> list[dict] | None:
  try:
    return agent.parse_tool_calls(text)
  except RecursionError:
    return None


def agent_reward(prompts: Sequence[str], completions: Sequence[str], *,
                 records: Sequence[Mapping], **unused) -> list[float | None]:
  """`agent.score_calls` (1/0) for tool-call records (AGENT_TASKS); None for others."""
  del prompts, unused
  return [_score_calls(r, c) if r.get('task') in AGENT_TASKS else None
          for r, c in zip(records, completions, strict=True)]


def _strip_think(text: str) -> str | None:
  """`text` after a leading `<think>…</think>` (required), or None."""
  text = text.strip()
  if (not text.startswith('<think>') or text.count('<think>') != 1
      or text.count('</think>') != 1):
    return None
  return text[text.index('</think>') + len('</think>'):].strip()


def has_answer_format(completion: str) -> bool:
  """`<think>…</think><answer>…</answer>`, whitespace between and around only.

  Each tag exactly once (no nesting), a non-empty answer, and nothing after
  the closing tag.
  """
  rest = _strip_think(completion)
  return (rest is not None and rest.startswith('<answer>') and rest.endswith('</answer>')
          and rest.count('<answer>') == 1 and rest.count('</answer>') == 1
          and bool(rest[len('<answer>'):-len('</answer>')].strip()))


def has_tool_call_format(completion: str) -> bool:
  """An optional `<think>…</think>`, then one or more `<tool_call>JSON</tool_call>`
  (whitespace between them only, nothing after), each a valid call."""
  text = completion.strip()
  if '<think>' in text or '</think>' in text:
    text = _strip_think(text)
    if text is None:
      return False
  calls, pos = 0, 0
  while pos < len(text):
    if not text.startswith('<tool_call>', pos):
      return False
    end = text.find('</tool_call>', pos)
    if end < 0 or '<tool_call>' in text[pos + len('<tool_call>'):end]:
      return False
    calls += 1
    pos = end + len('</tool_call>')
    while pos < len(text) and text[pos].isspace():
      pos += 1
  parsed = _parse_tool_calls(text)
  return calls > 0 and parsed is not None and len(parsed) == calls


def format_reward(prompts: Sequence[str], completions: Sequence[str], *,
                  records: Sequence[Mapping], **unused) -> list[float | None]:
  """1.0 if the completion has its task's shape, else 0.0; None for chat records.

  Agent records expect tool calls (`has_tool_call_format`), every other task
  `<think>…</think><answer>…</answer>` (`has_answer_format`). Chat turns have
  no prescribed shape.
  """
  del prompts, unused
  out = []
  for record, completion in zip(records, completions, strict=True):
    task = record.get('task')
    if task == 'chat':
      out.append(None)
    elif task in AGENT_TASKS:
      out.append(float(has_tool_call_format(completion)))
    else:
      out.append(float(has_answer_format(completion)))
  return out


# ============================================================== overlong ===

def overlong_penalty(max_new_tokens: int, buffer: int) -> RewardFn:
  """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) as a reward function.

  With L_max = max_new_tokens and L_cache = buffer, a completion of |y| tokens
  gets 0 for |y| <= L_max - L_cache, ((L_max - L_cache) - |y|) / L_cache
  above (down to -1 at L_max), and -1 when it was truncated. Needs the
  `lengths` column (completion tokens) and takes `truncated` when given.
  """
  if not (isinstance(max_new_tokens, int) and max_new_tokens > 0):
    raise ValueError(f'max_new_tokens (L_max) must be a positive int, got {max_new_tokens!r}')
  if not (isinstance(buffer, int) and 0 <= buffer <= max_new_tokens):
    raise ValueError(f'overlong buffer (L_cache) must be an int in [0, max_new_tokens='
                     f'{max_new_tokens}], got {buffer!r}')
  free = max_new_tokens - buffer

  def overlong(prompts: Sequence[str], completions: Sequence[str], *,
               lengths: Sequence[int], truncated: Sequence[bool] | None = None,
               **unused) -> list[float]:
    del prompts, unused
    if len(lengths) != len(completions):
      raise ValueError(f'{len(lengths)} lengths for {len(completions)} completions')
    truncated = [False] * len(lengths) if truncated is None else truncated
    out = []
    for length, cut in zip(lengths, truncated, strict=True):
      if cut or length >= max_new_tokens:
        out.append(-1.0)
      elif length <= free:
        out.append(0.0)
      else:
        out.append((free - float(length)) / buffer)
    return out

  overlong.__name__ = f'overlong_penalty_{max_new_tokens}_{buffer}'
  return overlong


# ============================================================ validation ===

def _check_value(value) -> float | None | str:
  """A valid reward as float (or None), or why it is garbage (a str)."""
  if value is None:
    return None
  if not isinstance(value, (numbers.Real, np.bool_)):
    return f'value of type {type(value).__name__}'
  value = float(value)
  if not math.isfinite(value) or abs(value) > MAX_ABS_REWARD:
    return f'value {value!r} is not finite or above {MAX_ABS_REWARD:g} in magnitude'
  return value


def _check_outputs(out, n: int) -> list[float | None | str]:
  """Per item: a reward, None, or the reason it is garbage (a str)."""
  if isinstance(out, np.ndarray) and out.ndim == 1:
    out = out.tolist()
  if not isinstance(out, (list, tuple)):
    return [f'returned {type(out).__name__}, not a list'] * n
  if len(out) != n:
    return [f'returned {len(out)} values for {n} items'] * n
  return [_check_value(v) for v in out]


def _describe(exc: BaseException) -> str:
  # str() of an arbitrary exception runs arbitrary code; keep it short and safe.
  try:
    text = f'{type(exc).__name__}: {exc}'
  except Exception:  # noqa: BLE001
    text = type(exc).__name__
  return text[:200]


# ========================================================== child process ===
#
# The child is a fork of the trainer. It must not touch JAX (or any other
# runtime with threads, or an accelerator): fork copies only the calling
# thread, so a JAX call in the child can deadlock or corrupt device state.
# Reward functions that need the accelerator (the preference reward model)
# run in-process (`isolate=False`). The child never returns into the
# trainer's code: every path ends in os._exit.

# Frame: item index, kind, value, length of a message that follows (utf-8).
_FRAME = struct.Struct('<IBdH')
_OK, _NONE, _EXCEPTION, _GARBAGE, _TIMEOUT = range(5)
_KIND_NAMES = {_EXCEPTION: 'exception', _GARBAGE: 'garbage', _TIMEOUT: 'timeout'}
_JUNK = 'wrote something other than result frames to its pipe'


class _ItemTimeout(BaseException):
  """Raised by the per-item alarm. A BaseException, so that the `except
  Exception` inside verifiers (math-verify has several) does not swallow it."""


def _raise_item_timeout(signum, frame):
  raise _ItemTimeout()


def _write_frame(fd: int, index: int, kind: int, value: float = 0.0, message: str = ''):
  data = message.encode('utf-8', 'replace')[:512]
  frame = _FRAME.pack(index, kind, value, len(data)) + data
  while frame:
    frame = frame[os.write(fd, frame):]


def _limit_memory(headroom_mb: int):
  """Caps the child's address space at what it has now plus `headroom_mb`.

  A fork of the trainer maps as much as the trainer, so an absolute limit
  would be meaningless; the headroom stops a verifier (sympy on 9^9^9^9) from
  taking the machine's memory.
  """
  try:
    with open('/proc/self/status') as f:
      vm_kb = next(int(line.split()[1]) for line in f if line.startswith('VmSize:'))
    limit = vm_kb * 1024 + headroom_mb * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
      limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
  except (OSError, ValueError, StopIteration):
    pass  # no /proc or the limit refused: the parent's deadline still holds
  try:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a segfault leaves no core file
  except (OSError, ValueError):
    pass


def _child_main(fd: int, fn: RewardFn, items: Sequence[int], prompts, completions,
                columns: Mapping, per_item: frozenset, timeout_s: float, memory_mb: int):
  """Scores `items` one at a time, streaming a frame per item to `fd`."""
  os.setsid()  # own process group: the parent kills helpers it starts too
  # The trainer's handlers (checkpoint on SIGTERM, ...) must not run here.
  for sig in signal.valid_signals():
    try:
      if callable(signal.getsignal(sig)):
        signal.signal(sig, signal.SIG_DFL)
    except (OSError, ValueError, TypeError):
      pass
  # A collection would walk (and so copy on write) every object the trainer
  # has, none of which can become garbage here.
  gc.freeze()
  _limit_memory(memory_mb)
  signal.signal(signal.SIGALRM, _raise_item_timeout)
  for i in items:
    item_columns = {k: (v[i:i + 1] if k in per_item else v) for k, v in columns.items()}
    try:
      signal.setitimer(signal.ITIMER_REAL, timeout_s)
      try:
        checked = _check_outputs(fn([prompts[i]], [completions[i]], **item_columns), 1)[0]
      finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    except _ItemTimeout:
      _write_frame(fd, i, _TIMEOUT, message=f'no result within {timeout_s:g} s (alarm)')
    except BaseException as e:  # noqa: BLE001  SystemExit and all: the item failed
      _write_frame(fd, i, _EXCEPTION, message=_describe(e))
    else:
      if checked is None:
        _write_frame(fd, i, _NONE)
      elif isinstance(checked, str):
        _write_frame(fd, i, _GARBAGE, message=checked)
      else:
        _write_frame(fd, i, _OK, checked)


# ========================================================== reward system ===

@dataclasses.dataclass
class _Worker:
  """A child scoring `pending` items of function `name`, in that order."""
  name: str
  pending: list[int]
  pid: int
  fd: int
  deadline: float = math.inf  # kill it when no frame has arrived by then
  buf: bytearray = dataclasses.field(default_factory=bytearray)


def _exited(pid: int) -> bool:
  # WNOWAIT: see the exit without reaping, so the pid (and the process group
  # id we are about to kill) cannot be reused meanwhile.
  try:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
  except ChildProcessError:
    return True


def _kill_and_reap(pid: int) -> str:
  """Kills the child and its process group, reaps it, says how it ended."""
  for kill in (os.killpg, os.kill):  # killpg fails if the child had no time to setsid
    try:
      kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
  try:
    _, status = os.waitpid(pid, 0)
  except ChildProcessError:
    return 'exit status unknown'
  if os.WIFSIGNALED(status):
    return f'killed by {signal.Signals(os.WTERMSIG(status)).name}'
  return f'exited with status {os.waitstatus_to_exitcode(status)}'


@dataclasses.dataclass
class _Scores:
  values: np.ndarray  # [B] float64, NaN = not applicable
  failures: int = 0
  wall_s: float = 0.0


class RewardSystem:
  """Weighted reward functions, each call isolated and time-limited.

  Isolated functions (the default) run in forked children, one item per call
  (`fn([prompt], [completion], **item_columns)`), under a per-item alarm of
  `timeout_s`; the parent kills a child that sends nothing for
  `timeout_s + grace_s` (a hang the alarm cannot break: C code, a swallowed
  alarm), scores that item 0 and starts a new child for the items left. The
  same goes for a child that dies (segfault, os._exit). A function's whole
  batch is cut at `batch_timeout_s` (items left score 0). No child outlives
  a call. Items are split over `workers` children per function, and all
  isolated functions run while the in-process ones do.

  An isolated function must not call JAX (the child is a fork of a
  multithreaded process; see the note above `_child_main`) and should not
  use SIGALRM (signal.alarm would cancel the per-item timer, leaving only the
  parent's kill).

  Functions with isolate=False run in the trainer's process on the whole
  batch: for trusted code that already contains the untrusted part
  (code_reward's sandbox) or must use the accelerator (a reward model).
  Their exceptions and garbage are caught, but a hang there is not.

  Args:
    functions: name -> reward function.
    weights: name -> weight, the same names as `functions`.
    timeout_s: per-item wall-clock limit of isolated functions.
    isolate: name -> whether to isolate; missing names are isolated.
    batch_timeout_s: cap on one isolated function's whole batch.
    workers: children per isolated function.
    memory_mb: address space a child may add to what it inherits.
    grace_s: how long past timeout_s the parent waits before SIGKILL.
  """

  def __init__(self, functions: Mapping[str, Callable], weights: Mapping[str, float], *,
               timeout_s: float = 10.0, isolate: Mapping[str, bool] | None = None,
               batch_timeout_s: float = 120.0, workers: int = 2, memory_mb: int = 2048,
               grace_s: float = 1.0):
    isolate = dict(isolate or {})
    if not functions:
      raise ValueError('functions is empty: a reward system needs at least one function')
    for name, fn in functions.items():
      if not callable(fn):
        raise ValueError(f'reward function {name!r} is not callable: {fn!r}')
    if set(weights) != set(functions):
      raise ValueError(f'weights must name exactly the functions {sorted(functions)}; '
                       f'got {sorted(weights)}')
    for name, w in weights.items():
      if not (isinstance(w, numbers.Real) and math.isfinite(w)):
        raise ValueError(f'weight of {name!r} must be a finite number, got {w!r}')
    if set(isolate) - set(functions):
      raise ValueError(f'isolate names unknown functions {sorted(set(isolate) - set(functions))}'
                       f'; functions are {sorted(functions)}')
    for key, value in (('timeout_s', timeout_s), ('batch_timeout_s', batch_timeout_s),
                       ('grace_s', grace_s)):
      if not value > 0:
        raise ValueError(f'{key} must be > 0, got {value}')
    if workers < 1 or memory_mb < 64:
      raise ValueError(f'workers must be >= 1 and memory_mb >= 64, got {workers}, {memory_mb}')
    self.functions = dict(functions)
    self.weights = {k: float(v) for k, v in weights.items()}
    self.isolate = {name: bool(isolate.get(name, True)) for name in functions}
    self.timeout_s, self.batch_timeout_s, self.grace_s = timeout_s, batch_timeout_s, grace_s
    self.workers, self.memory_mb = workers, memory_mb
    self._logged: set[tuple[str, str]] = set()

  # ------------------------------------------------------------- results ---

  def _fail(self, scores: _Scores, name: str, index: int, kind: str, reason: str):
    scores.values[index] = 0.0
    scores.failures += 1
    if (name, kind) not in self._logged:
      self._logged.add((name, kind))
      logging.warning('reward %r: %s on item %d (%s); it scores 0. Further %s failures of %r '
                      'are counted in stats, not logged.', name, kind, index, reason, kind, name)

  def _record(self, scores: _Scores, name: str, index: int, checked):
    if checked is None:
      scores.values[index] = np.nan
    elif isinstance(checked, str):
      self._fail(scores, name, index, 'garbage', checked)
    else:
      scores.values[index] = checked

  # ---------------------------------------------------------- in-process ---

  def _run_in_process(self, name, scores, prompts, completions, columns):
    n = len(completions)
    try:
      checked_all = _check_outputs(
          self.functions[name](list(prompts), list(completions), **columns), n)
    except (Exception, SystemExit) as e:  # noqa: BLE001  KeyboardInterrupt still stops
      for i in range(n):
        self._fail(scores, name, i, 'exception', _describe(e))
      return
    for i, checked in enumerate(checked_all):
      self._record(scores, name, i, checked)

  # ------------------------------------------------------------ isolated ---

  def _spawn(self, name, items, scores, args) -> _Worker | None:
    """Forks a child for `items`; on failure to fork they all fail."""
    prompts, completions, columns, per_item = args
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()  # or the child's copy of the buffer is written twice
      except (OSError, ValueError, AttributeError):
        pass
    try:
      r, w = os.pipe()
    except OSError as e:
      for i in items:
        self._fail(scores, name, i, 'crash', f'no pipe: {e}')
      return None
    try:
      with warnings.catch_warnings():
        # JAX warns at every fork that its threads do not survive one; the
        # child never calls JAX (see above), so the warning is noise here.
        warnings.filterwarnings('ignore', message=r'os\.fork\(\) was called',
                                category=RuntimeWarning)
        pid = os.fork()
    except OSError as e:
      os.close(r)
      os.close(w)
      for i in items:
        self._fail(scores, name, i, 'crash', f'could not fork: {e}')
      return None
    if pid == 0:
      try:
        os.close(r)
        _child_main(w, self.functions[name], items, prompts, completions, columns, per_item,
                    self.timeout_s, self.memory_mb)
      finally:
        try:
          sys.stdout.flush()
          sys.stderr.flush()
        finally:
          os._exit(0)
    os.close(w)
    os.set_blocking(r, False)
    return _Worker(name, list(items), pid, r)

  def _run_isolated(self, workers: list[_Worker], batch_deadline: dict, all_scores, args,
                    finished: dict):
    """Collects frames until every worker is done, killing and restarting as needed.

    Sets finished[name] to the time the last child of function `name` ended.
    """
    sel = selectors.DefaultSelector()
    live: dict[int, _Worker] = {}

    def add(w: _Worker | None):
      if w is not None:
        w.deadline = time.monotonic() + self.timeout_s + self.grace_s
        live[w.fd] = w
        sel.register(w.fd, selectors.EVENT_READ, w)

    def end(w: _Worker, kind: str, reason: str | None = None, *, cut_all: bool = False):
      """Ends `w`'s child. The item it was on (every item left, with cut_all)
      fails as `kind` (`reason`, or how the child ended); a new child takes
      the rest."""
      sel.unregister(w.fd)
      del live[w.fd]
      os.close(w.fd)
      ended = _kill_and_reap(w.pid)
      failed = w.pending if cut_all else w.pending[:1]
      for i in failed:
        self._fail(all_scores[w.name], w.name, i, kind, reason or ended)
      rest = w.pending[len(failed):]
      if rest:
        add(self._spawn(w.name, rest, all_scores[w.name], args))
      if not any(other.name == w.name for other in live.values()):
        finished[w.name] = time.monotonic()

    def read_frames(w: _Worker) -> bool:
      """Handles the complete frames in w.buf; False on a frame out of protocol."""
      while len(w.buf) >= _FRAME.size:
        index, kind, value, size = _FRAME.unpack_from(w.buf)
        if len(w.buf) < _FRAME.size + size:
          break
        message = bytes(w.buf[_FRAME.size:_FRAME.size + size]).decode('utf-8', 'replace')
        del w.buf[:_FRAME.size + size]
        if not w.pending or index != w.pending[0] or kind > _TIMEOUT:
          return False
        w.pending.pop(0)
        scores = all_scores[w.name]
        if kind == _OK:
          self._record(scores, w.name, index, _check_value(value))
        elif kind == _NONE:
          self._record(scores, w.name, index, None)
        else:
          self._fail(scores, w.name, index, _KIND_NAMES[kind], message)
        w.deadline = time.monotonic() + self.timeout_s + self.grace_s
      return True

    def drain(w: _Worker) -> str:
      """Reads what is there: 'more', 'eof' or 'junk'."""
      for _ in range(64):  # bounded: a writer cannot keep us here
        try:
          chunk = os.read(w.fd, 1 << 16)
        except BlockingIOError:
          return 'more'
        except OSError:
          return 'eof'
        if not chunk:
          return 'eof'
        w.buf += chunk
        if not read_frames(w):
          return 'junk'
      return 'more'

    try:
      for w in workers:
        add(w)
      while live:
        for key, _ in sel.select(timeout=0.05):
          w = key.data
          if w.fd not in live:
            continue
          state = drain(w)
          if state == 'junk':
            end(w, 'crash', _JUNK)
          elif state == 'eof':
            end(w, 'crash')  # reason: how it exited
        now = time.monotonic()
        for w in list(live.values()):
          if now >= batch_deadline[w.name]:
            state = drain(w)
            if state == 'junk':
              end(w, 'crash', _JUNK)
            else:
              end(w, 'timeout', f'the batch limit of {self.batch_timeout_s:g} s', cut_all=True)
          elif now >= w.deadline:
            end(w, 'timeout', f'no result within {self.timeout_s + self.grace_s:g} s; killed')
          elif _exited(w.pid):
            # Dead, but the pipe is not at EOF: a helper it started holds it.
            state = drain(w)
            end(w, 'crash', _JUNK if state == 'junk' else None)
    finally:
      for w in list(live.values()):
        sel.unregister(w.fd)
        os.close(w.fd)
        _kill_and_reap(w.pid)
        for i in w.pending:
          self._fail(all_scores[w.name], w.name, i, 'crash', 'the scoring call was interrupted')
        finished[w.name] = time.monotonic()
      sel.close()

  # ---------------------------------------------------------------- call ---

  def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns):
    """Scores a batch.

    Args:
      prompts, completions: [B] texts.
      **columns: per-item lists (or arrays) of length B, and plain values
        passed whole; all are passed to every function.

    Returns:
      (total, per_function, stats): total [B] float64, the weighted sum over
      the applicable functions (0 where none applies); per_function name ->
      [B] float64 with NaN where not applicable and 0 where the function
      failed; stats, flat floats: `<name>/mean`, `<name>/std` (over its
      applicable items, 0 when none), `<name>/applicable` (fraction),
      `<name>/failures` (count), `<name>/wall_s`, and `total/mean`,
      `total/std`, `unscored` (items no function applies to), `failures`,
      `wall_s`.
    """
    t0 = time.monotonic()
    n = len(completions)
    if len(prompts) != n:
      raise ValueError(f'{len(prompts)} prompts for {n} completions')
    per_item = set()
    for key, value in columns.items():
      if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim):
        if len(value) != n:
          raise ValueError(f'column {key!r} has {len(value)} items for {n} completions; '
                           'per-item columns must have one entry per completion')
        per_item.add(key)
    prompts, completions = list(prompts), list(completions)
    args = (prompts, completions, columns, frozenset(per_item))
    scores = {name: _Scores(np.full(n, np.nan)) for name in self.functions}

    isolated = [name for name in self.functions if self.isolate[name] and n]
    workers, deadlines, started = [], {}, {}
    try:
      for name in isolated:
        started[name] = time.monotonic()
        limit = min(self.batch_timeout_s,
                    (self.timeout_s + self.grace_s) * -(-n // self.workers) + self.grace_s)
        deadlines[name] = started[name] + limit
        for k in range(min(self.workers, n)):
          worker = self._spawn(name, list(range(n))[k::self.workers], scores[name], args)
          if worker is not None:
            workers.append(worker)
      # In-process functions run while the children work.
      for name in self.functions:
        if name not in isolated and n:
          t = time.monotonic()
          self._run_in_process(name, scores[name], prompts, completions, columns)
          scores[name].wall_s = time.monotonic() - t
    except BaseException:
      for w in workers:  # interrupted: no child may outlive the call
        os.close(w.fd)
        _kill_and_reap(w.pid)
      raise
    finished = {}
    self._run_isolated(workers, deadlines, scores, args, finished)
    for name in isolated:
      scores[name].wall_s = finished.get(name, time.monotonic()) - started[name]

    per_function = {name: s.values for name, s in scores.items()}
    total = np.zeros(n)
    scored = np.zeros(n, bool)
    stats = {}
    for name, s in scores.items():
      applicable = ~np.isnan(s.values)
      total += self.weights[name] * np.where(applicable, s.values, 0.0)
      scored |= applicable
      values = s.values[applicable]
      stats[f'{name}/mean'] = float(values.mean()) if values.size else 0.0
      stats[f'{name}/std'] = float(values.std()) if values.size else 0.0
      stats[f'{name}/applicable'] = float(applicable.mean()) if n else 0.0
      stats[f'{name}/failures'] = float(s.failures)
      stats[f'{name}/wall_s'] = s.wall_s
    stats['total/mean'] = float(total.mean()) if n else 0.0
    stats['total/std'] = float(total.std()) if n else 0.0
    stats['unscored'] = float(n - scored.sum())
    stats['failures'] = float(sum(s.failures for s in scores.values()))
    stats['wall_s'] = time.monotonic() - t0
    return total, per_function, stats


# =============================================================== builder ===

BUILTIN_FUNCTIONS = ('stem', 'steps', 'sound_stem', 'code', 'agent', 'format', 'overlong')
_CONFIG_KEYS = ('functions', 'timeout_s', 'max_new_tokens', 'overlong_buffer',
                'batch_timeout_s', 'workers', 'code_timeout_s')


def default_reward_system(cfg: Mapping, extra_functions: Mapping[str, Callable] | None = None
                          ) -> RewardSystem:
  """A RewardSystem from a config like

      {'functions': {'stem': 1.0, 'code': 1.0, 'format': 0.1, 'overlong': 0.1},
       'timeout_s': 10.0, 'max_new_tokens': 128, 'overlong_buffer': 16}

  Args:
    cfg: 'functions' maps names (BUILTIN_FUNCTIONS or keys of
      `extra_functions`) to weights; 'timeout_s' (default 10), 'batch_timeout_s'
      (120) and 'workers' (2) go to RewardSystem; 'max_new_tokens' (L_max)
      and 'overlong_buffer' (L_cache) are needed by 'overlong';
      'code_timeout_s' (default 5) is the sandbox limit of one program.
    extra_functions: more reward functions by name (the preference reward
      model). They run in-process: a model on the accelerator must not be
      called from a forked child.

  Raises:
    ValueError: for an unknown key or function name (the message lists the
      valid ones), or a missing overlong setting.
  """
  cfg = dict(cfg)
  extra = dict(extra_functions or {})
  unknown = sorted(set(cfg) - set(_CONFIG_KEYS))
  if unknown:
    raise ValueError(f'unknown reward config keys {unknown}; valid keys: {list(_CONFIG_KEYS)}')
  clash = sorted(set(extra) & set(BUILTIN_FUNCTIONS))
  if clash:
    raise ValueError(f'extra_functions {clash} shadow built-in reward functions; rename them')
  if 'functions' not in cfg or not cfg['functions']:
    raise ValueError("reward config needs 'functions': {name: weight, ...}; valid names: "
                     f'{list(BUILTIN_FUNCTIONS) + sorted(extra)}')
  weights = dict(cfg['functions'])
  valid = list(BUILTIN_FUNCTIONS) + sorted(extra)
  unknown = sorted(set(weights) - set(valid))
  if unknown:
    raise ValueError(f'unknown reward functions {unknown}; valid names: {valid}')
  functions, isolate = {}, {}
  for name in weights:
    if name == 'stem':
      functions[name] = stem_reward
    elif name == 'steps':
      functions[name] = steps_reward
    elif name == 'sound_stem':
      functions[name] = sound_stem_reward
    elif name == 'code':
      # Already sandboxed, and batched over the sandbox's own workers.
      functions[name], isolate[name] = make_code_reward(cfg.get('code_timeout_s', 5.0)), False
    elif name == 'agent':
      functions[name] = agent_reward
    elif name == 'format':
      functions[name] = format_reward
    elif name == 'overlong':
      if 'max_new_tokens' not in cfg or 'overlong_buffer' not in cfg:
        raise ValueError("the 'overlong' reward needs cfg['max_new_tokens'] (L_max) and "
                         "cfg['overlong_buffer'] (L_cache)")
      # Arithmetic on lengths: nothing to isolate.
      functions[name] = overlong_penalty(cfg['max_new_tokens'], cfg['overlong_buffer'])
      isolate[name] = False
    else:
      functions[name], isolate[name] = extra[name], False
  return RewardSystem(functions, weights, timeout_s=cfg.get('timeout_s', 10.0), isolate=isolate,
                      batch_timeout_s=cfg.get('batch_timeout_s', 120.0),
                      workers=cfg.get('workers', 2))
