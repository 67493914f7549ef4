"""Step-level measurements of UniMedVL: the text decoding step and the image denoising step, eager against compiled,
and against the same steps of another revision of the package (the baseline), on one model's weights.

What decides GPU speed at full size is not FLOPs but what every step makes the host do: kernel launches (aten ops)
and device-to-host synchronisations. Both are counted here with the profiler, device-independently, so that a CPU run
proves them:

* host synchronisations: `aten::_local_scalar_dense` (every `.item()`, `int()`, `float()`, `bool()` of a tensor),
  `aten::nonzero`, `aten::masked_select`, `aten::is_nonzero`, `aten::equal` and `aten::unique*` (outputs sized by data),
  plus `Tensor.tolist()` / `.numpy()` (host reads that do not pass through aten on the CPU), seen by a
  `TorchFunctionMode`;
* aten ops: every `aten::` profiler event, and the top-level ones (not inside another aten op: what Python issued);
* graph breaks: `torch._dynamo.explain` of the step (graphs and breaks, with the reasons).

Decode: ms per token of `generate` (greedy, `t(n) − t(1)` over `n − 1` tokens) with the dynamic cache, the static
cache, and the static cache compiled through transformers' own mechanism (`compile_config`); the counts are taken on
the forward of one decoding step exactly as `generate` prepares it (`prepare_inputs_for_generation`). Denoise: ms per
Euler step of `generate_image` (`(t(s₂) − t(s₁)) / (s₂ − s₁)`, both guidance branches on every step), eager and with
the step compiled (`compile_config`); the counts are taken on one call of the model's `denoising_step`. The baseline's
figures come from the same public calls (its per-step counts as the difference of two `generate_image` runs).
"""

import contextlib
import importlib
import io
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import types
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from transformers import CompileConfig, StaticCache


HOST_SYNC_OPS = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::is_nonzero",
    "aten::equal",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
)
"""Profiler events that read device data on the host (or size an output by it)."""

HOST_READ_METHODS = ("tolist", "numpy")
"""Tensor methods that copy data to the host without an aten op on the CPU."""

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class OpCounts:
    """Host synchronisations (total and per kind) and aten ops of one run of a function."""

    host_syncs: int
    sync_kinds: dict[str, int]
    aten_events: int
    top_level_aten_ops: int

    def minus(self, other: "OpCounts", divisor: int = 1) -> dict:
        """Per-unit difference `(self − other) / divisor` as a record."""
        kinds = Counter(self.sync_kinds)
        kinds.subtract(other.sync_kinds)
        return {
            "host_syncs": (self.host_syncs - other.host_syncs) / divisor,
            "sync_kinds": {name: count / divisor for name, count in kinds.items() if count},
            "aten_events": (self.aten_events - other.aten_events) / divisor,
            "top_level_aten_ops": (self.top_level_aten_ops - other.top_level_aten_ops) / divisor,
        }

    def record(self) -> dict:
        return {
            "host_syncs": self.host_syncs,
            "sync_kinds": dict(self.sync_kinds),
            "aten_events": self.aten_events,
            "top_level_aten_ops": self.top_level_aten_ops,
        }


class _HostReads(TorchFunctionMode):
    """Counts `Tensor.tolist()` / `Tensor.numpy()` calls."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READ_METHODS:
            self.counts[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object], host_reads: bool = True) -> OpCounts:
    """Counts the host synchronisations and aten ops of one run of `fn` under the profiler. `host_reads=False` leaves
    out the function mode that sees `tolist()` / `numpy()`: pass it for a function compiled with `fullgraph=True`
    (which cannot read tensors to the host: that would be a graph break), because dynamo would recompile the function
    for the mode."""
    reads = _HostReads()
    with profile(activities=[ProfilerActivity.CPU]) as prof, reads if host_reads else contextlib.nullcontext():
        fn()
    events = [event for event in prof.events() if event.name.startswith("aten::")]
    kinds = Counter(event.name for event in events if event.name in HOST_SYNC_OPS and not _inside(event, HOST_SYNC_OPS))
    kinds.update(reads.counts)
    top_level = sum(not _inside(event, None) for event in events)
    return OpCounts(sum(kinds.values()), dict(kinds), len(events), top_level)


def _inside(event, names: tuple[str, ...] | None) -> bool:
    """Whether a profiler event runs inside an aten op (of `names`, or any aten op with None): `bool(tensor)` is one
    synchronisation although `aten::is_nonzero` calls `aten::_local_scalar_dense`."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::") and (names is None or parent.name in names):
            return True
        parent = parent.cpu_parent
    return False


def explain_graphs(fn: Callable, *args, **kwargs) -> dict:
    """Graphs and graph breaks of `fn(*args, **kwargs)` under `torch._dynamo.explain` (which runs it once, without
    gradients, as inference does)."""
    with torch.no_grad():
        explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = sorted({str(reason.reason).splitlines()[0][:160] for reason in explanation.break_reasons})
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count, "break_reasons": reasons}


def ms_per_unit(short_seconds: Sequence[float], long_seconds: Sequence[float], low: int, high: int) -> float:
    """Milliseconds per unit (a decoded token, an Euler step) from timed runs of `low` and of `high` units:
    `(min t(high) − min t(low)) / (high − low)`, so that what a call costs once (prefill, VAE, set-up) cancels and
    machine load, which only ever adds time, counts as little as it can (the difference of single runs went negative
    on a loaded 2-core machine)."""
    return (min(long_seconds) - min(short_seconds)) / (high - low) * 1e3


def ops_per_unit(run: Callable[[int], object], low: int, high: int, host_reads: bool = True) -> dict:
    """Host synchronisations and aten ops per unit of `run(count)`, from its runs of `low` and `high` units;
    `host_reads` as in [`count_ops`] (False when the step is compiled)."""
    short = count_ops(lambda: run(low), host_reads)
    long = count_ops(lambda: run(high), host_reads)
    return long.minus(short, high - low)


def compile_config_for(device: torch.device, backend: str = "inductor", dynamic: bool = False) -> CompileConfig:
    """The compile settings of the compiled rows: one full graph (of static shapes unless `dynamic`) through
    transformers' `CompileConfig`. On a GPU, inductor's CUDA graphs (`mode="reduce-overhead"`, what `generate` uses
    by default). On a CPU, which transformers compiles only when told to (`_compile_all_devices`), inductor without
    its size/stride asserts on the graph inputs (`size_asserts=False`): dynamo's guards already check every input's
    sizes and strides before the graph runs, and the ~500 asserts of a 28-layer decoding step cost a tenth of it."""
    if backend != "inductor":
        config = CompileConfig(fullgraph=True, dynamic=dynamic, backend=backend, mode=None)
    elif device.type == "cuda":
        config = CompileConfig(fullgraph=True, dynamic=dynamic, backend=backend, mode="reduce-overhead")
    else:
        config = CompileConfig(fullgraph=True, dynamic=dynamic, backend=backend, mode=None, options={"size_asserts": False})
    config._compile_all_devices = True
    return config


# ----------------------------------------------------------------------------------------------------------------------
# The baseline revision
# ----------------------------------------------------------------------------------------------------------------------


def load_baseline_package(revision: str) -> types.ModuleType:
    """`modeling_unimedvl` as committed at git `revision` of this repository, imported as `unimedvl_baseline` (its
    `__init__` is not run, so nothing is registered with the Auto classes). Returns its `modeling_unimedvl` module."""
    try:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", revision, "modeling_unimedvl"],
            cwd=REPO_ROOT, check=True, capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        raise SystemExit(f"--baseline {revision}: cannot read that revision with git: {detail.decode().strip() or error}")
    folder = pathlib.Path(tempfile.mkdtemp(prefix="unimedvl_baseline_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = types.ModuleType("unimedvl_baseline")
    package.__path__ = [str(folder / "modeling_unimedvl")]
    sys.modules["unimedvl_baseline"] = package
    return importlib.import_module("unimedvl_baseline.modeling_unimedvl")


def baseline_model(module: types.ModuleType, model: torch.nn.Module) -> torch.nn.Module:
    """The baseline revision's model class with `model`'s configuration and weights (same state-dict keys)."""
    config_module = importlib.import_module(module.__name__.rsplit(".", 1)[0] + ".configuration_unimedvl")
    config = config_module.UniMedVLConfig.from_dict(model.config.to_dict())
    config._attn_implementation = model.config._attn_implementation
    device, dtype = model.device, model.dtype
    with torch.device(device):
        baseline = module.UniMedVLForConditionalGeneration._from_config(config, dtype=dtype)
    missing, unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"baseline state dict differs: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return baseline.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------------------------------


class DecodeSteps:
    """One decoding step at a time on a static cache, prepared exactly as `generate` prepares it. The cache holds the
    prompt and `new_tokens − 1` more tokens, as `generate(max_new_tokens=new_tokens)` sizes it (so that a forward
    compiled by `generate` runs on it without recompiling): the prefill's token and `new_tokens − 1` steps."""

    def __init__(self, model, inputs: dict, cache_field: str, new_tokens: int):
        self.model, self.inputs_, self.cache_field = model, inputs, cache_field
        length = inputs["input_ids"].shape[1]
        self.cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=length + new_tokens - 1)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Empties the cache (same tensors) and prefills the prompt again."""
        model, inputs = self.model, self.inputs_
        self.cache.reset()
        model_kwargs = {"attention_mask": inputs["attention_mask"], "use_cache": True}
        model_kwargs["position_ids"] = model._prepare_position_ids_for_generation(inputs["input_ids"], {**inputs})
        if model._supports_logits_to_keep():  # what `generate` adds
            model_kwargs["logits_to_keep"] = 1
        forward_kwargs = {**inputs, **model_kwargs, self.cache_field: self.cache}
        outputs = model(**forward_kwargs)
        self.input_ids = torch.cat([inputs["input_ids"], outputs.logits[:, -1].argmax(-1)[:, None]], dim=-1)
        self.model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)

    def inputs(self) -> dict:
        """The forward's keyword arguments for the next token (without advancing)."""
        kwargs = {key: value for key, value in self.model_kwargs.items() if key != self.cache_field}
        return self.model.prepare_inputs_for_generation(
            self.input_ids, next_sequence_length=1, **{self.cache_field: self.cache}, **kwargs
        )

    @torch.no_grad()
    def step(self, forward: Callable) -> torch.Tensor:
        """Runs `forward` on the next token, appends the greedy choice and returns the logits `[batch, vocab]`."""
        outputs = forward(**self.inputs(), return_dict=True)
        logits = outputs.logits[:, -1]
        self.input_ids = torch.cat([self.input_ids, logits.argmax(-1)[:, None]], dim=-1)
        self.model_kwargs = self.model._update_model_kwargs_for_generation(outputs, self.model_kwargs)
        return logits


def greedy_tokens(model, inputs: dict, count: int, pad_token_id: int, **kwargs) -> torch.Tensor:
    """`count` new greedy tokens (end of sequence disabled) from `model.generate`."""
    output = model.generate(
        **inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False, eos_token_id=None,
        pad_token_id=pad_token_id, **kwargs,
    )
    return output[:, inputs["input_ids"].shape[1]:]


# ----------------------------------------------------------------------------------------------------------------------
# Denoise
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recording(model, name: str):
    """Records the positional arguments of every call of the method `name` of `model` (the calls still run)."""
    calls = []
    method = getattr(model, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return method(*args, **kwargs)

    setattr(model, name, spy)
    try:
        yield calls
    finally:
        delattr(model, name)


def generate_image_latents(model, inputs: dict, size: int, steps: int, settings: dict, **kwargs) -> torch.Tensor:
    """Final latents of a seeded `generate_image` with `steps` inference steps (no VAE decoding)."""
    output = model.generate(
        **inputs, generation_mode="image", height=size, width=size, num_inference_steps=steps, decode=False,
        generator=torch.Generator().manual_seed(0), **settings, **kwargs,
    )
    return output.latents


__all__ = [
    "HOST_SYNC_OPS",
    "DecodeSteps",
    "OpCounts",
    "baseline_model",
    "count_ops",
    "compile_config_for",
    "explain_graphs",
    "generate_image_latents",
    "greedy_tokens",
    "load_baseline_package",
    "ms_per_unit",
    "ops_per_unit",
    "recording",
]
