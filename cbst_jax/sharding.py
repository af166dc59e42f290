"""One data-parallel layout for one device, many devices and many hosts: a 1-D ``('data',)``
mesh, replicated state and batch-sharded inputs. Host-local numpy batches become global
arrays with ``jax.make_array_from_process_local_data``. Multi-host runs agree on decisions
about shared files through process 0 (:func:`agree`) and meet at :func:`barrier`s."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(enabled: bool, **kwargs) -> None:
    """Calls ``jax.distributed.initialize`` (multi-host runs) before any device is touched."""
    if enabled:
        jax.distributed.initialize(**kwargs)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``('data',)`` over all (global) devices."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``'data'``; other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def to_global(host_batch, mesh: Mesh):
    """Host-local numpy pytree (leading axis = this host's rows) -> global batch-sharded jax arrays."""
    sharding = batch_sharded(mesh)

    def one(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, host_batch)


def to_host(x) -> np.ndarray:
    """A global (possibly multi-host) array fully gathered to every host as numpy."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def replicated_to_host(x) -> np.ndarray:
    """A replicated array (e.g. a train-state leaf) as numpy, from this process's own copy."""
    return np.asarray(x.addressable_data(0))


def agree(flag: bool) -> bool:
    """Process 0's answer to a yes/no question about shared files, so every process takes the
    same branch (and so runs the same collectives) even while process 0 is writing those files."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.array(bool(flag))))


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def broadcast_ints(values: list[int]) -> list[int]:
    """Process 0's list of integers, on every process."""
    if jax.process_count() == 1:
        return list(values)
    from jax.experimental import multihost_utils
    n = int(multihost_utils.broadcast_one_to_all(np.array(len(values), np.int64)))
    padded = np.zeros(max(n, 1), np.int64)
    padded[:min(n, len(values))] = values[:n]
    return [int(v) for v in multihost_utils.broadcast_one_to_all(padded)[:n]]
