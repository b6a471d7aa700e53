"""A safetensors file read by byte range: a whole tensor, or only a range of its rows (dim 0,
contiguous in the file), with plain ``read`` calls into a buffer of the right size.

A rank of a sharded model reads only its rows of each parameter. ``safetensors.safe_open``
can slice too, but through a memory map, which hides what is read from the kernel's I/O
accounting; here every byte read is a ``read`` of exactly the bytes needed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16,
    "I16": torch.int16, "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """One open safetensors file: its header on opening, tensor data on :meth:`read`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)
        try:
            size = self.path.stat().st_size
            n = int.from_bytes(self._read_at(0, 8), "little") if size >= 8 else -1
            try:
                header = json.loads(self._read_at(8, n)) if 2 <= n <= size - 8 else None
            except ValueError:
                header = None
            if not isinstance(header, dict):
                raise ValueError(f"{str(self.path)!r} is not a safetensors file (no JSON header "
                                 f"of the length its first 8 bytes give)")
            header.pop("__metadata__", None)
            self._data = 8 + n
            self._entries = {k: self._entry(k, v, size - self._data) for k, v in header.items()}
        except BaseException:
            self._file.close()
            raise

    def _entry(self, key: str, entry: dict, data_size: int) -> tuple[torch.dtype, tuple, int]:
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path.name}: {key!r} has dtype {entry['dtype']!r}, which "
                             f"is not one of {sorted(_DTYPES)}")
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or end > data_size:
            raise ValueError(f"{self.path.name}: {key!r} ({entry['dtype']} {list(shape)}) has "
                             f"data offsets {begin}-{end}, which do not fit it (file truncated?)")
        return dtype, shape, begin

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def read(self, key: str, rows: slice = slice(None)) -> Tensor:
        """The tensor ``key``, or only its rows ``rows`` (a slice of dim 0, step 1)."""
        dtype, shape, begin = self._entries[key]
        if not shape:
            if rows != slice(None):
                raise ValueError(f"{self.path.name}: {key!r} is a scalar; it has no rows")
            return self._read_at(self._data + begin, dtype.itemsize, dtype).reshape(())
        start, stop, step = rows.indices(shape[0])
        if step != 1:
            raise ValueError(f"rows of {key!r} must be a contiguous range, got step {step}")
        count = max(stop - start, 0)
        row = math.prod(shape[1:]) * dtype.itemsize
        data = self._read_at(self._data + begin + start * row, count * row, dtype)
        return data.reshape(count, *shape[1:])

    def _read_at(self, offset: int, n: int, dtype: torch.dtype | None = None):
        """``n`` bytes at ``offset``: as bytes, or as a flat tensor of ``dtype``."""
        out = torch.empty(n, dtype=torch.uint8)
        view, done = memoryview(out.numpy()), 0
        self._file.seek(offset)
        while done < n:  # a read may return less than asked (large reads, pipes)
            got = self._file.readinto(view[done:])
            if not got:
                raise ValueError(f"{str(self.path)!r} ends at byte {offset + done}, before "
                                 f"the {n} bytes at offset {offset} (file truncated?)")
            done += got
        return bytes(view) if dtype is None else out.view(dtype)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
