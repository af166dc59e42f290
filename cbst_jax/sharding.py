"""One data-parallel layout for one device, many devices and many hosts: a 1-D ``('data',)``
mesh, replicated state and batch-sharded inputs. Host-local numpy batches become global
arrays with ``jax.make_array_from_process_local_data``."""
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


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This host's share of a global batch; the global batch must split evenly over devices."""
    n_dev = mesh.devices.size
    if global_batch % n_dev:
        raise ValueError(f"global batch {global_batch} is not divisible by the {n_dev} devices of the mesh")
    return global_batch // jax.process_count()


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
