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


class SafetensorsReader:
    """Reads the tensors of one `.safetensors` file, checking that the file holds every byte its header promises."""

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
                raise CheckpointError(f"{path} has a corrupt safetensors header ({error}).") from error
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self.data_offset = 8 + header_length
        data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        if self.data_offset + data_end > size:
            raise CheckpointError(
                f"{path} is truncated: its header needs {self.data_offset + data_end} bytes but the file has {size}. "
                "Download it again."
            )
        for key, entry in header.items():
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {entry['dtype']}.")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
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
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - start != expected:
            raise CheckpointError(f"{self.path}: tensor {key} of shape {shape} needs {expected} bytes, header gives {end - start}.")
        buffer = bytearray(end - start)
        with open(self.path, "rb") as handle:
            handle.seek(self.data_offset + start)
            if handle.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{self.path} is truncated inside tensor {key}.")
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


__all__ = ["CheckpointError", "SafetensorsReader", "SAFETENSORS_DTYPES"]
