"""Data parallelism over a 1-D ``jax.sharding.Mesh`` of every device of every process: batches split on axis 0,
state replicated.

In a multi-process run (``attrjax.distributed``) each process holds only its rows of a global batch
(``process_rows``); ``shard_batch`` assembles the global array from every process's rows without moving them.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: every device of every process) with one ``data`` axis."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh's data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises unless a global batch of ``batch_size`` splits evenly over the mesh's devices."""
    if batch_size % mesh.devices.size:
        raise ValueError(f"batch size {batch_size} is not divisible by the {mesh.devices.size} devices of the mesh "
                         f"({jax.process_count()} processes); choose a batch size that is a multiple of the device "
                         "count")


def process_rows(batch_size: int, mesh: Mesh) -> slice:
    """The rows of every global batch of ``batch_size`` that this process supplies: those its own devices hold
    (all of them in a single-process run)."""
    check_batch_size(batch_size, mesh)
    sharding = batch_sharding(mesh)
    indices = sharding.devices_indices_map((batch_size,))
    starts = sorted(indices[device][0].start or 0 for device in sharding.addressable_devices)
    per_device = batch_size // mesh.devices.size
    if starts != list(range(starts[0], starts[0] + per_device * len(starts), per_device)):
        raise ValueError("this process's devices are not contiguous in the mesh; build it over jax.devices() "
                         "(data_mesh()), which lists each process's devices together")
    return slice(starts[0], starts[0] + per_device * len(starts))


def shard_batch(batch, mesh: Mesh):
    """Places this process's rows of a global batch (pytree of host arrays with a leading batch axis) split over
    the mesh's data axis; returns the global arrays, ``process_count`` times as many rows in a multi-process run."""
    sharding = batch_sharding(mesh)
    local_devices = len(sharding.addressable_devices)
    for leaf in jax.tree.leaves(batch):
        if leaf.shape[0] % local_devices:
            check_batch_size(leaf.shape[0] * mesh.devices.size // local_devices, mesh)
            raise ValueError(f"this process's {leaf.shape[0]} rows do not split over its {local_devices} devices")
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda rows: jax.make_array_from_process_local_data(sharding, np.asarray(rows)), batch)


def host_value(leaf) -> np.ndarray:
    """A leaf's value on this host; a replicated global array of a multi-process run is read from its local copy."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.is_fully_replicated:
            raise ValueError("only replicated (or fully addressable) arrays have their whole value on every process")
        leaf = leaf.addressable_data(0)
    return np.asarray(leaf)


def _replicated_copy(leaf, sharding: NamedSharding):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_replicated_copy(jax.random.key_data(leaf), sharding),
                                        impl=jax.random.key_impl(leaf))
    value = host_value(leaf)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicate(tree, mesh: Mesh):
    """A copy of a pytree (state, teacher variables, a PRNG key) replicated on every device of the mesh.

    Do this before the first step: a jitted step fed uncommitted arrays once and mesh-placed outputs afterwards
    would compile twice. The result never shares buffers with ``tree``, so a step that donates its state cannot free
    the caller's arrays, e.g. a teacher's variables that a student starts from. In a multi-process run every process
    must pass the same values.
    """
    if jax.process_count() == 1:
        # device_put(..., may_alias=False) onto several devices still hands back the caller's buffer as the copy on
        # the device that holds it (jax 0.10), which a donating step then frees: copy first.
        copied = jax.tree.map(lambda leaf: jnp.copy(leaf) if isinstance(leaf, jax.Array) else leaf, tree)
        return jax.device_put(copied, replicated(mesh), may_alias=False)
    return jax.tree.map(lambda leaf: _replicated_copy(leaf, replicated(mesh)), tree)
