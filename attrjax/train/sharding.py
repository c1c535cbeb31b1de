"""Data parallelism over a 1-D ``jax.sharding.Mesh``: batches split on axis 0, state replicated."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all local devices) with one ``data`` axis."""
    return Mesh(np.asarray(devices if devices is not None else jax.local_devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch, mesh: Mesh):
    """Places a host batch (pytree of arrays with a leading batch axis) split over the mesh's data axis."""
    num_devices = mesh.devices.size
    for leaf in jax.tree.leaves(batch):
        if leaf.shape[0] % num_devices:
            raise ValueError(f"batch size {leaf.shape[0]} is not divisible by the {num_devices} devices of the "
                             "mesh; choose a batch size that is a multiple of the device count")
    return jax.device_put(batch, batch_sharding(mesh))


def replicate(tree, mesh: Mesh):
    """A copy of a pytree (state, teacher variables) replicated on every device of the mesh.

    Do this before the first step: a jitted step fed uncommitted arrays once and mesh-placed outputs afterwards
    would compile twice. The result never shares buffers with ``tree`` (``may_alias=False``), so a step that donates
    its state cannot free the caller's arrays, e.g. a teacher's variables that a student starts from.
    """
    return jax.device_put(tree, replicated(mesh), may_alias=False)
