"""A streaming safetensors reader: validates the header and reads one tensor at a time with plain file reads.

Memory-mapping a 29 GB file leaves every touched page resident; reading tensor by tensor keeps the converter's memory
at one tensor plus one output shard, so the 14B release converts on a 24 GiB machine.
"""

import json
import math
import os

import torch


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or does not match the expected layout."""


def _header_problem(key: str, entry) -> str | None:
    """Why the header entry of tensor `key` is unusable, or None when it is a valid `{dtype, shape, data_offsets}`."""
    if not isinstance(entry, dict):
        return f"tensor {key} has a {type(entry).__name__} entry instead of {{dtype, shape, data_offsets}}"
    missing = [name for name in ("dtype", "shape", "data_offsets") if name not in entry]
    if missing:
        return f"tensor {key} has no {', '.join(missing)}"
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        return f"tensor {key} has unsupported dtype {entry['dtype']!r}"
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape):
        return f"tensor {key} has shape {shape!r}; sizes must be non-negative integers"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(offset, int) and not isinstance(offset, bool) for offset in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        return f"tensor {key} has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end"
    expected = math.prod(shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[entry["dtype"]]).element_size()
    if offsets[1] - offsets[0] != expected:
        return f"tensor {key} of shape {shape} and dtype {entry['dtype']} needs {expected} bytes, its data_offsets give {offsets[1] - offsets[0]}"
    return None


class SafetensorsReader:
    """Reads the tensors of one `.safetensors` file, checking its header (every entry's dtype, shape and byte range)
    and that the file holds every byte the header promises, so that a damaged file fails with a message naming it."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"Missing checkpoint file {path}.")
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes): it has no safetensors header.")
            header_length = int.from_bytes(prefix, "little")
            if header_length <= 0 or 8 + header_length > size:
                raise CheckpointError(
                    f"{path} is truncated or not a safetensors file: the header claims {header_length} bytes, "
                    f"the file has {size}."
                )
            try:
                header = json.loads(handle.read(header_length))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise CheckpointError(f"{path} has a corrupt safetensors header ({error}).") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} has a corrupt safetensors header: a JSON {type(header).__name__}, not an object.")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{path} has a corrupt safetensors header: __metadata__ is not an object.")
        for key, entry in header.items():
            problem = _header_problem(key, entry)
            if problem:
                raise CheckpointError(f"{path} has a corrupt safetensors header: {problem}.")
        self.metadata = metadata
        self.entries = header
        self.data_offset = 8 + header_length
        data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        if self.data_offset + data_end > size:
            raise CheckpointError(
                f"{path} is truncated: its header needs {self.data_offset + data_end} bytes but the file has {size}. "
                "Download it again."
            )

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.entries:
            raise CheckpointError(f"{self.path} has no tensor {key}.")
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.entries[key]["dtype"]]

    def nbytes(self, key: str) -> int:
        start, end = self.entries[key]["data_offsets"]
        return end - start

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        start, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        buffer = bytearray(end - start)
        with open(self.path, "rb") as handle:
            handle.seek(self.data_offset + start)
            if handle.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{self.path} is truncated inside tensor {key}.")
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


__all__ = ["CheckpointError", "SafetensorsReader", "SAFETENSORS_DTYPES"]
