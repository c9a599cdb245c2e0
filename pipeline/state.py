"""Building a model's train state on the mesh.

The train state is a plain pytree: {'params', 'opt_state', 'step', 'rng'}.
Params are the pure-dict form of the NNX model's state; `nnx.merge(graphdef,
params)` rebuilds the module inside a jitted step (trace time only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from models.llama import ModelConfig, Transformer
from pipeline import sharding


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit arg
class ModelSpec:
  """What a stage needs to build, shard and run one model."""
  config: ModelConfig
  graphdef: Any
  axes: dict  # pure dict of logical axis tuples, parallel to params
  param_shardings: Any


def model_spec(config: ModelConfig, mesh: Mesh, rules) -> ModelSpec:
  abstract = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abstract)
  axes = sharding.param_axes(abs_state)
  shardings = sharding.tree_shardings(abs_state.to_pure_dict(), axes, mesh, rules)
  return ModelSpec(config, graphdef, axes, shardings)


def init_params(spec: ModelSpec, seed: int) -> dict:
  """Random params created directly in their shardings (never whole on one host)."""
  def init(key):
    return nnx.split(Transformer(spec.config, nnx.Rngs(key)))[1].to_pure_dict()
  return jax.jit(init, out_shardings=spec.param_shardings)(jax.random.key(seed))


def abstract_params(spec: ModelSpec) -> dict:
  shapes = nnx.split(nnx.eval_shape(lambda: Transformer(spec.config, nnx.Rngs(0))))[1]
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes.to_pure_dict(), spec.param_shardings)


def merge(spec: ModelSpec, params) -> Transformer:
  return nnx.merge(spec.graphdef, params)


def opt_state_shardings(tx: optax.GradientTransformation, trainable, mesh: Mesh):
  """Each optimizer leaf shaped like a param (Adam's moments) takes that
  param's sharding; the rest (counts) are replicated. trainable: arrays or
  ShapeDtypeStructs with shardings."""
  return optax.tree_map_params(
      tx, lambda _, param_sharding: param_sharding, jax.eval_shape(tx.init, trainable),
      jax.tree.map(lambda x: x.sharding, trainable),
      transform_non_params=lambda _: sharding.replicated(mesh))


def abstract_train_state(spec: ModelSpec, tx: optax.GradientTransformation, mesh: Mesh,
                         extras: dict | None = None) -> dict:
  """The train state of `init_train_state` as ShapeDtypeStructs with its
  shardings, built without allocating anything (ahead-of-time compiles)."""
  rep = sharding.replicated(mesh)
  extras = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rep)
            for k, v in (extras or {}).items()}
  params = abstract_params(spec)
  trainable = {'params': params, **extras} if extras else params
  opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                           jax.eval_shape(tx.init, trainable),
                           opt_state_shardings(tx, trainable, mesh))
  rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  return {'params': params, **extras, 'opt_state': opt_state,
          'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
          'rng': jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep)}


def init_train_state(spec: ModelSpec, params, tx: optax.GradientTransformation,
                     mesh: Mesh, seed: int, extras: dict | None = None):
  """Returns (state, state_shardings). Optimizer moments take the shardings of
  the params they belong to (set explicitly: left to GSPMD, jit(tx.init)
  returned them replicated, a full copy of both Adam moments on every device,
  experiments/memory_scaling.py); other optimizer leaves are replicated.

  extras: more trainable arrays (e.g. distillation's projection W), kept in
  the state next to 'params' and optimised with them.
  """
  # Extras are small: replicated on the mesh.
  extras = jax.device_put(extras or {}, sharding.replicated(mesh))
  trainable = {'params': params, **extras} if extras else params
  opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, trainable, mesh))(trainable)
  state = {'params': params, **extras, 'opt_state': opt_state,
           'step': jnp.zeros((), jnp.int32), 'rng': jax.random.key_data(jax.random.key(seed))}
  rep = sharding.replicated(mesh)
  state = jax.device_put(state, jax.tree.map(
      lambda x: x.sharding if x.ndim else rep, state))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  return state, shardings
