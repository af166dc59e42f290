"""Reads and writes MXNet 1.x `.params` files (the NDArray list format of `mx.nd.save`)
with numpy only.

Layout (little endian): uint64 magic 0x112, uint64 reserved, uint64 count, `count`
NDArray records, uint64 name count, then names as (uint64 length, bytes). A record is
uint32 magic (0xF993FAC9 = v2 with a storage type, 0xF993FAC8 = v1; anything else is the
legacy layout whose first word is ndim with uint32 dims), [v2: int32 storage type, 0 =
dense], uint32 ndim, int64 dims, then (unless ndim == 0) int32 device type, int32
device id, int32 dtype flag and the raw data.
"""
import struct

import numpy as np

LIST_MAGIC = 0x112
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8,
          6: np.int64}
DTYPE_FLAGS = {np.dtype(v): k for k, v in DTYPES.items()}


class _Reader:

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ValueError("truncated MXNet .params file")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values if len(values) > 1 else values[0]

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated MXNet .params file")
        self.pos += n
        return self.data[self.pos - n:self.pos]


def _read_ndarray(r: _Reader) -> np.ndarray:
    magic = r.take("<I")
    if magic == NDARRAY_V2_MAGIC:
        stype = r.take("<i")
        if stype != 0:
            raise ValueError(f"sparse NDArray (storage type {stype}) is not supported")
        ndim = r.take("<I")
        shape = r.take(f"<{ndim}q") if ndim else ()
    elif magic == NDARRAY_V1_MAGIC:
        ndim = r.take("<I")
        shape = r.take(f"<{ndim}q") if ndim else ()
    else:  # legacy: the magic word was ndim, dims are uint32
        ndim = magic
        shape = r.take(f"<{ndim}I") if ndim else ()
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if ndim == 0:
        return np.zeros((0,), np.float32)
    _dev_type, _dev_id, flag = r.take("<iii")
    if flag not in DTYPES:
        raise ValueError(f"unsupported MXNet dtype flag {flag}")
    dtype = np.dtype(DTYPES[flag]).newbyteorder("<")
    count = int(np.prod(shape))
    return np.frombuffer(r.raw(count * dtype.itemsize), dtype).reshape(shape).astype(dtype.newbyteorder("="))


def load_mxnet_params(path) -> dict[str, np.ndarray]:
    """{name: array} from an MXNet `.params` file (names keep their `arg:`/`aux:` prefix)."""
    with open(path, "rb") as f:
        r = _Reader(f.read())
    magic, _reserved = r.take("<QQ")
    if magic != LIST_MAGIC:
        raise ValueError(f"{path}: not an MXNet NDArray list (magic {magic:#x})")
    arrays = [_read_ndarray(r) for _ in range(r.take("<Q"))]
    names = [r.raw(r.take("<Q")).decode() for _ in range(r.take("<Q"))]
    if len(names) != len(arrays):
        raise ValueError(f"{path}: {len(arrays)} arrays but {len(names)} names")
    return dict(zip(names, arrays))


def save_mxnet_params(path, arrays: dict[str, np.ndarray]):
    """Writes {name: array} in the v2 dense layout `mx.nd.save` produces (CPU context)."""
    out = [struct.pack("<QQQ", LIST_MAGIC, 0, len(arrays))]
    for a in arrays.values():
        a = np.asarray(a)
        shape = a.shape or (1,)
        out.append(struct.pack(f"<IiI{len(shape)}q", NDARRAY_V2_MAGIC, 0, len(shape), *shape))
        out.append(struct.pack("<iii", 1, 0, DTYPE_FLAGS[a.dtype]))
        out.append(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes())
    out.append(struct.pack("<Q", len(arrays)))
    for name in arrays:
        out.append(struct.pack("<Q", len(name.encode())) + name.encode())
    with open(path, "wb") as f:
        f.write(b"".join(out))
