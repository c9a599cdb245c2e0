"""orbax checkpoints: a stage's resumable state and its final params.

Layout of a stage folder:
  checkpoints/<step>/   train state (params, opt state, step, rng) + data iterator state
  final/                params only, written when the stage finishes; the next
                        stage (or `init_from`) loads these.
Restores check every array's shape against the model first and refuse a
mismatch with the first mismatching parameter's name, without touching the
checkpoint.

Multi-process runs write and restore collectively: every process calls save
and restore, orbax writes each array's shards from the process that holds
them (the folder must be on storage all hosts share). Data-iterator states
differ per process (each loads its own share), so all of them are gathered
into the one JSON item and each process restores its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

META_FILE = 'model_meta.json'


def _key_name(key) -> str:
  """Dict key, sequence index or attribute name (NamedTuple optimizer states)."""
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree) -> dict[str, tuple]:
  """{'blocks/0/attn/wq_dnh': shape}, from arrays or orbax metadata alike."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = '/'.join(_key_name(k) for k in path)
    out[name] = tuple(leaf.shape)
  return out


def check_shapes(saved_tree, target_tree, path: str) -> None:
  """Raises ValueError naming the first parameter whose shape differs."""
  saved, target = _flat_shapes(saved_tree), _flat_shapes(target_tree)
  for name, shape in target.items():
    if name not in saved:
      raise ValueError(f'checkpoint {path} has no parameter {name!r} '
                       f'(model expects shape {shape}); it holds {sorted(saved)[:8]}...')
    if saved[name] != shape:
      raise ValueError(f'checkpoint {path}: parameter {name!r} has shape {saved[name]} '
                       f'but the model expects {shape}; check the model config '
                       'against the run that wrote it (the checkpoint is left untouched)')
  extra = sorted(set(saved) - set(target))
  if extra:
    raise ValueError(f'checkpoint {path} has parameters the model lacks: {extra[:8]}')


def gather_process_states(state: dict) -> list:
  """Every process's JSON-serialisable `state`, in process order, on every process."""
  if jax.process_count() == 1:
    return [state]
  data = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(data)))  # [P]
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  rows = multihost_utils.process_allgather(padded)  # [P, max length]
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


def own_process_state(saved: dict, path: str) -> dict:
  """This process's entry of a gathered data state (see `gather_process_states`)."""
  if 'process_states' not in saved:  # written before states were gathered: one process
    saved = {'process_states': [saved]}
  states = saved['process_states']
  if len(states) != jax.process_count():
    raise ValueError(f'checkpoint {path} was written by {len(states)} processes but this run '
                     f'has {jax.process_count()}; resume with the same number of processes '
                     '(each process resumes its own share of the data)')
  return states[jax.process_index()]


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class StageCheckpointer:
  """Periodic, resumable checkpoints of one stage (orbax CheckpointManager)."""

  def __init__(self, stage_dir: str, save_every: int, keep: int = 2):
    self.directory = os.path.join(stage_dir, 'checkpoints')
    self.save_every = save_every
    self._manager = ocp.CheckpointManager(
        self.directory,
        # Handlers named up front so that a fresh process can read the
        # metadata of old steps before restoring them.
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Saves when step is a multiple of save_every (or force); returns whether it did."""
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    if self._manager.latest_step() == step:
      return False
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({'process_states': gather_process_states(data_state)})),
        force=True)
    return True

  def restore(self, step: int, like_state) -> tuple[Any, dict]:
    """Restores (state, data_state) onto the shardings of `like_state`."""
    path = os.path.join(self.directory, str(step))
    saved = self._manager.item_metadata(step)['state']
    check_shapes(saved, like_state, path)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(like_state)), data=ocp.args.JsonRestore()))
    return restored['state'], own_process_state(restored['data'], path)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def save_params(path: str, params) -> None:
  """Writes params alone (a stage's `final/`), atomically: orbax writes to a
  temporary folder and renames it, so a killed save leaves no half folder."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), params, force=True)
  checkpointer.wait_until_finished()


def load_params(path: str, like_params):
  """Loads params saved by `save_params` onto the shardings of `like_params`
  (arrays or ShapeDtypeStructs with shardings)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no params checkpoint at {path}')
  checkpointer = ocp.StandardCheckpointer()
  check_shapes(checkpointer.metadata(path).item_metadata.tree, like_params, path)
  return checkpointer.restore(path, _abstract(like_params))


def exists_on_every_process(path: str) -> bool:
  """Whether `path` exists, looked up by every process before any goes on.

  For a file that process 0 writes next (a stage's filter.json): a process
  that looked later than process 0 wrote it would take the resume branch
  alone, or read half a file.
  """
  found = os.path.exists(path)
  multihost_utils.sync_global_devices(f'looked up {path}')
  return found


def write_json(path: str, obj, **dump_kwargs) -> None:
  """json.dump to a temporary file renamed over `path`: a reader, or a kill
  mid-write, never sees half a file."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, **dump_kwargs)
  os.replace(tmp, path)


def write_model_meta(stage_dir: str, tokenizer, model_cfg) -> None:
  """Next to final/: what a later stage must check before using the params.
  Written by process 0; the others wait until it exists."""
  if jax.process_index() == 0:
    write_json(os.path.join(stage_dir, META_FILE),
               {'tokenizer_fingerprint': tokenizer.fingerprint(),
                'model': dataclasses.asdict(model_cfg)}, indent=2)
  multihost_utils.sync_global_devices(f'model_meta {stage_dir}')


def check_same_tokenizer(params_path: str, tokenizer, what: str = 'teacher') -> None:
  """Models that exchange logits or text token by token (a teacher and its
  student, a policy and its reward model) must share a tokenizer."""
  meta_path = os.path.join(os.path.dirname(os.path.abspath(params_path)), META_FILE)
  if not os.path.exists(meta_path):
    raise ValueError(f'{what} params {params_path} have no {META_FILE} beside them; '
                     'cannot check that both models share a tokenizer')
  with open(meta_path) as f:
    fingerprint = json.load(f)['tokenizer_fingerprint']
  if fingerprint != tokenizer.fingerprint():
    raise ValueError(f'the {what} at {params_path} was trained with tokenizer '
                     f'{fingerprint} but this run uses {tokenizer.fingerprint()}: both models '
                     'must share a tokenizer')
