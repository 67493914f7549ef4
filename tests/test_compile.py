"""The decoding step and the denoising step compile as one graph without host synchronisation, and compiled
generation equals eager generation (issue 14).

The default suite checks graphs with `torch._dynamo.explain`, host synchronisations with the profiler
(`benchmarks.steps.count_ops`) and equality with a recording `eager` backend (dynamo captures the graph, nothing is
code-generated); the inductor compiles, which take minutes on the CPU, are `--run-slow`.
"""

import pathlib
import sys

import numpy as np
import pytest
import torch


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.steps import DecodeSteps, compile_config_for, count_ops, explain_graphs, recording  # noqa: E402
from modeling_unimedvl.modeling_unimedvl import CACHE_FIELD  # noqa: E402


QUESTION = "What imaging modality is shown?"
PROMPTS = ["What imaging modality is shown?", "Is there a fracture of the left femur in this radiograph of the patient?"]
CPU = torch.device("cpu")
"""Where the tests compile: transformers compiles there only when told to, which `compile_config_for` does."""
T2I = dict(generation_mode="image", height=64, width=64, num_inference_steps=6, timestep_shift=1.0, cfg_text_scale=4.0,
           cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), decode=False)
I2I = dict(generation_mode="image", num_inference_steps=4, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
           cfg_renorm_type="text_channel", decode=False)


class GraphRecorder:
    """A `torch.compile` backend that runs the captured graphs as they are (eager) and keeps them."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward

    def __deepcopy__(self, memo):  # `CompileConfig.to_dict()` deep-copies its backend
        return self


@pytest.fixture(scope="module")
def batch_inputs(tiny_processor, reference_image):
    images = [[reference_image], [reference_image.rotate(90, expand=True)]]
    inputs = tiny_processor(images=images, text=PROMPTS)
    assert (inputs["attention_mask"] == 0).any(), "the prompts must need left padding"
    return inputs


def test_model_declares_full_graph_compilation(tiny_model):
    assert tiny_model._can_compile_fullgraph


def test_decode_step_is_one_graph_without_host_synchronisation(tiny_model, batch_inputs):
    """The forward of a decoding step on a static cache, as `generate` prepares it (left-padded batch)."""
    decode = DecodeSteps(tiny_model, dict(batch_inputs), CACHE_FIELD, new_tokens=6)
    inputs = decode.inputs()
    assert set(inputs["attention_mask"]) == {"full_attention"}  # transformers' masks, built outside the step
    assert inputs["attention_mask"]["full_attention"].shape[-1] == decode.cache.layers[0].max_cache_len
    explanation = explain_graphs(tiny_model.__call__, **inputs)
    assert (explanation["graphs"], explanation["graph_breaks"]) == (1, 0), explanation["break_reasons"]
    decode.step(tiny_model.__call__)
    counts = count_ops(lambda: decode.step(tiny_model.__call__))
    assert counts.host_syncs == 0, counts.sync_kinds
    assert counts.aten_events > 0


def test_generate_compiles_the_decode_step_and_equals_eager(tiny_model, batch_inputs):
    """`generate` compiles the step through `compile_config` (one graph); greedy tokens equal the eager dynamic-cache
    path for a left-padded batch."""
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    eager = tiny_model.generate(**batch_inputs, **options)
    recorder = GraphRecorder()
    compiled = tiny_model.generate(**batch_inputs, cache_implementation="static", compile_config=compile_config_for(CPU, recorder), **options)
    assert torch.equal(compiled, eager)
    assert len(recorder.graphs) == 1
    assert torch.equal(tiny_model.generate(**batch_inputs, cache_implementation="static", **options), eager)


def test_decode_loop_synchronises_only_for_the_stop_check(tiny_model, tiny_processor, reference_image):
    """Per generated token the whole loop reads back one value: transformers' stop check (`aten::is_nonzero`)."""
    inputs = tiny_processor(images=reference_image, text=QUESTION)
    options = dict(do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation="static")
    short = count_ops(lambda: tiny_model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **options))
    long = count_ops(lambda: tiny_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, **options))
    per_token = long.minus(short, 4)
    assert per_token["host_syncs"] <= 1, per_token["sync_kinds"]


def _recorded_steps(model, inputs, **options):
    with recording(model, "denoising_step") as calls:
        latents = model.generate(**inputs, generator=torch.Generator().manual_seed(0), **options).latents
    return calls, latents


@pytest.mark.parametrize("case", ["text_to_image", "image_to_image"])
def test_denoising_step_is_one_graph_without_host_synchronisation(case, tiny_model, tiny_processor, reference_image):
    if case == "text_to_image":
        calls, _ = _recorded_steps(tiny_model, tiny_processor(text="Axial CT of the head.", generation_mode="image"), **T2I)
        # σ = 1, .8, .6, .4, .2: text guidance while σ > 0.4 (float32 rule: σ = float32(0.4) is not above it)
        assert [call[0].start_embeds.shape[0] for call in calls] == [2, 2, 2, 1, 1]
    else:
        inputs = tiny_processor(images=reference_image, text="Turn this into a FLAIR image.", generation_mode="image")
        calls, _ = _recorded_steps(tiny_model, inputs, **I2I)
        assert [call[0].start_embeds.shape[0] for call in calls] == [3, 3, 3]
    for args in (calls[0], calls[-1]):
        explanation = explain_graphs(tiny_model.denoising_step, *args)
        assert (explanation["graphs"], explanation["graph_breaks"]) == (1, 0), explanation["break_reasons"]
        with torch.no_grad():
            counts = count_ops(lambda: tiny_model.denoising_step(*args))
        assert counts.host_syncs == 0, counts.sync_kinds


def test_sampler_loop_reads_nothing_back_to_the_host(tiny_model, tiny_processor):
    """Everything that depends only on the request is computed once: a longer run adds steps, never a host read."""
    inputs = tiny_processor(text="Axial CT of the head.", generation_mode="image")
    options = dict(T2I, cfg_interval=(0.0, 1.0))
    runs = [
        count_ops(lambda: tiny_model.generate(**inputs, **dict(options, num_inference_steps=steps))) for steps in (3, 6)
    ]
    per_step = runs[1].minus(runs[0], 3)
    assert per_step["host_syncs"] == 0, per_step["sync_kinds"]


def test_compiled_image_generation_equals_eager(tiny_model, tiny_processor, reference_image):
    """`compile_config` compiles the step: one graph per number of evaluated guidance rows, the same latents."""
    t2i_inputs = tiny_processor(text=["A chest X-ray.", "An axial brain MRI."], generation_mode="image")
    eager = tiny_model.generate(**t2i_inputs, generator=torch.Generator().manual_seed(0), **T2I).latents
    recorder = GraphRecorder()
    compiled = tiny_model.generate(
        **t2i_inputs, generator=torch.Generator().manual_seed(0), compile_config=compile_config_for(CPU, recorder), **T2I
    ).latents
    assert torch.equal(compiled, eager)
    assert len(recorder.graphs) == 2  # 4 rows (two prompts, text guidance), then 2 rows
    i2i_inputs = tiny_processor(images=reference_image, text="Turn this into a FLAIR image.", generation_mode="image")
    eager = tiny_model.generate(**i2i_inputs, generator=torch.Generator().manual_seed(1), **I2I).latents
    compiled = tiny_model.generate(
        **i2i_inputs, generator=torch.Generator().manual_seed(1), compile_config=compile_config_for(CPU, recorder), **I2I
    ).latents
    assert torch.equal(compiled, eager)
    assert len(recorder.graphs) == 3


@pytest.mark.slow
def test_inductor_compiled_generation_equals_eager(tiny_model, batch_inputs, tiny_processor):
    """The real compiler (inductor, C++ on the CPU): greedy tokens equal, final latents within float32 rounding."""
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    eager = tiny_model.generate(**batch_inputs, **options)
    config = compile_config_for(CPU, "inductor")
    compiled = tiny_model.generate(**batch_inputs, cache_implementation="static", compile_config=config, **options)
    assert torch.equal(compiled, eager)
    inputs = tiny_processor(text="Axial CT of the head.", generation_mode="image")
    eager = tiny_model.generate(**inputs, generator=torch.Generator().manual_seed(0), **T2I).latents
    compiled = tiny_model.generate(**inputs, generator=torch.Generator().manual_seed(0), compile_config=config, **T2I).latents
    assert (compiled - eager).abs().max() < 1e-4


def test_pipeline_passes_compile_config_and_gives_the_same_image(tiny_model, tiny_processor):
    from unimedvl_pipelines.pipeline_unimedvl import UniMedVLPipeline, default_scheduler

    pipe = UniMedVLPipeline(tiny_model, tiny_processor, default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    options = dict(height=64, width=64, num_inference_steps=4, timestep_shift=1.0, output_type="np")
    eager = pipe("Axial CT of the head.", generator=torch.Generator().manual_seed(3), **options).images
    recorder = GraphRecorder()
    compiled = pipe(
        "Axial CT of the head.", generator=torch.Generator().manual_seed(3), compile_config=compile_config_for(CPU, recorder), **options
    ).images
    assert np.array_equal(compiled, eager)
    assert len(recorder.graphs) == 2  # σ = 1, 2/3: text guidance (2 rows); σ = 1/3: the full context alone


@pytest.mark.parametrize("value", [{"fullgraph": True}, "reduce-overhead", True])
def test_compile_config_of_another_type_is_refused(tiny_model, tiny_processor, value):
    inputs = tiny_processor(text="Axial CT of the head.", generation_mode="image")
    with pytest.raises(TypeError, match=f"`compile_config` must be a transformers CompileConfig, got {type(value).__name__}"):
        tiny_model.generate(**inputs, **dict(T2I, num_inference_steps=2), compile_config=value)
