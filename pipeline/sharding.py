"""The device mesh and the logical-axis → mesh-axis rules.

Model code names logical axes only (`models/llama.py` stores them in each
parameter's `axes` metadata); the config maps them to the mesh axes
('data', 'fsdp', 'tensor') with a short rules table such as

    rules = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'),
             ('heads', 'tensor'), ('kv_heads', 'tensor'), ('vocab', 'tensor'))

Logical axes missing from the table are replicated.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one entry of `shape` may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f'config.mesh.shape={tuple(shape)} must have {len(MESH_AXES)} '
                     f'entries, one per axis {MESH_AXES}')
  if shape.count(-1) > 1:
    raise ValueError(f'config.mesh.shape={tuple(shape)}: at most one entry may be -1')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'config.mesh.shape={tuple(shape)} does not divide '
                       f'{len(devices)} devices')
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f'config.mesh.shape={tuple(shape)} needs {int(np.prod(shape))} '
                     f'devices but {len(devices)} are available')
  # Auto axes: GSPMD propagates shardings from the annotated inputs/outputs.
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]]) -> P:
  """PartitionSpec for one array from its logical axis names.

  A dimension that the mapped mesh axes do not divide evenly, or whose mesh
  axes an earlier dimension already uses, is replicated instead: small test
  models (vocab 97, 2 kv heads) must run on any mesh.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    target = table.get(name)
    mesh_axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    ways = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
    if not mesh_axes or size % ways:
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


def param_axes(abstract_state: nnx.State) -> dict:
  """Pure dict of logical axis tuples, parallel to the params pure dict."""
  axes = jax.tree.map(lambda v: v.get_metadata()['axes'], abstract_state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return axes.to_pure_dict()


def tree_shardings(abstract_tree, axes_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of arrays given a parallel tree of logical axes."""
  return jax.tree.map(
      lambda x, ax: NamedSharding(mesh, logical_to_spec(ax, x.shape, mesh, rules)),
      abstract_tree, axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Batch arrays [B, T, ...]: B over the mesh axes of logical 'batch'."""
  target = dict(rules).get('batch', ('data', 'fsdp'))
  return NamedSharding(mesh, P(target))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
  """Places this process's slice of a global batch onto the mesh.

  Each process holds rows [i * B/P, (i+1) * B/P) of the global batch (the data
  loader shards by process index); `make_array_from_process_local_data`
  assembles the global array without any host holding all of it.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def shard_global_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
  """Places a batch that every process holds whole (GRPO rollouts, distillation
  pairs: computed identically everywhere) onto the mesh; each process copies
  only the rows its own devices hold."""
  return {k: jax.make_array_from_callback(np.shape(v), sharding, lambda idx, v=v: np.asarray(v)[idx])
          for k, v in batch.items()}


def to_host(tree):
  """numpy copies of a tree of arrays, whole on every process.

  `jax.device_get` refuses an array whose shards live on other processes;
  those are all-gathered first (a collective: every process must call this).
  """
  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)
