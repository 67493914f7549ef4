"""Measuring on the machine at hand: its header line, its two ceilings (copy bandwidth, matmul throughput), timers,
peak memory, and the JSON-lines report.

Every figure is a JSON object on its own line. A timed figure carries `seconds` (measured, median of the repeats) and
`limit_seconds` (the floor: per stage the larger of FLOPs / measured matmul throughput and bytes / measured copy
bandwidth, summed over the stages; see `accounting.Work`),
and `ratio = limit_seconds / seconds` (the fraction of the roofline reached, ≤ 1 up to noise).
"""

import datetime
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch


H100_BF16_DENSE_SPEC_FLOPS = 989e12
"""NVIDIA's H100 SXM bf16 dense tensor-core peak (datasheet), printed for reference next to the measured one."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_header(device: torch.device, mode: str, script: str) -> dict:
    """The header record: machine (GPU name or CPU model), core count, library versions, UTC date, mode."""
    import diffusers
    import transformers

    record = {
        "kind": "header",
        "script": script,
        "mode": mode,
        "device": device.type,
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        record.update(
            gpu_memory_gib=properties.total_memory / 2**30,
            multiprocessors=properties.multi_processor_count,
            cuda=torch.version.cuda,
        )
    return record


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3) -> float:
    """Median seconds of `repeats` calls of `fn` after `warmup` untimed ones (CUDA events on a GPU, wall clock else)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def measure_copy_bandwidth(device: torch.device, num_bytes: int, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s: a copy of a `num_bytes` buffer, counting bytes read plus bytes written."""
    source = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = time_call(lambda: target.copy_(source), device, warmup=2, repeats=repeats)
    return 2 * num_bytes / seconds


def measure_matmul_throughput(device: torch.device, size: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """Matrix-product throughput in FLOP/s: a `size`³ product of random (never zero) matrices in `dtype`."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = time_call(lambda: torch.matmul(a, b, out=out), device, warmup=3, repeats=repeats)
    return 2 * size**3 / seconds


def ceilings_records(device: torch.device, copy_bytes: int, matmul_size: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """The two ceiling records (`copy_bandwidth` in bytes/s, `matmul_throughput` in FLOP/s) measured now."""
    bandwidth = measure_copy_bandwidth(device, copy_bytes)
    throughput = measure_matmul_throughput(device, matmul_size, dtype)
    copy_record = {"name": "copy_bandwidth", "value": bandwidth, "unit": "B/s", "buffer_bytes": copy_bytes}
    matmul_record = {
        "name": "matmul_throughput",
        "value": throughput,
        "unit": "FLOP/s",
        "size": matmul_size,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if device.type == "cuda" and "H100" in torch.cuda.get_device_name(device) and dtype == torch.bfloat16:
        matmul_record["spec_value"] = H100_BF16_DENSE_SPEC_FLOPS
    return copy_record, matmul_record


def timed_record(name: str, seconds: float, limit_seconds: float, **fields) -> dict:
    """A timed figure: measured `seconds`, floor `limit_seconds`, `ratio = limit_seconds / seconds`."""
    return {"name": name, "seconds": seconds, "limit_seconds": limit_seconds, "ratio": limit_seconds / seconds, **fields}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory since the last reset (GPU), or the process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class JsonLinesReport:
    """Prints every record as one JSON line on stdout and, with `path`, writes the same lines to that file."""

    def __init__(self, path: str | None = None):
        self.records: list[dict] = []
        self._handle = open(path, "w") if path else None

    def emit(self, record: dict) -> dict:
        line = json.dumps(record, sort_keys=False)
        print(line, flush=True)
        if self._handle is not None:
            self._handle.write(line + "\n")
            self._handle.flush()
        self.records.append(record)
        return record

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def resolve_device(name: str | None, tiny: bool) -> torch.device:
    """`--device`, defaulting to CUDA for full-size runs and to the CPU for `--tiny`; CUDA without a GPU is an error."""
    device = torch.device(name or ("cpu" if tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "No CUDA device: the full-size benchmark needs a GPU (14.6 B parameters in bf16). "
            "Run with --tiny for the CPU smoke version."
        )
    return device


__all__ = [
    "H100_BF16_DENSE_SPEC_FLOPS",
    "JsonLinesReport",
    "ceilings_records",
    "cpu_model",
    "machine_header",
    "measure_copy_bandwidth",
    "measure_matmul_throughput",
    "module_bytes",
    "peak_memory_bytes",
    "reset_peak_memory",
    "resolve_device",
    "synchronize",
    "time_call",
    "timed_record",
]
