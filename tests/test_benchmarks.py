"""Benchmarks: the `--tiny` CPU runs of both scripts (every figure present, consistent ratios) and the work accounting
that their roofline limits rest on (parameter counts, FLOPs against torch's counter, the image sampler's calls)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import accounting  # noqa: E402
from benchmarks.bench_inference import BenchmarkInputs, build_model, tiny_image_processor  # noqa: E402
from benchmarks.configs import full_size_config, tiny_config, training_config  # noqa: E402
from benchmarks.measurement import resolve_device  # noqa: E402


def _run_script(module: str, tmp_path: pathlib.Path, *options: str) -> tuple[list[dict], list[dict]]:
    """Runs `python -m module --tiny --output FILE [options]`; returns the records from stdout and from the file."""
    output = tmp_path / f"{module.rsplit('.', 1)[-1]}.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", module, "--tiny", "--output", str(output), *options],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    printed = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    written = [json.loads(line) for line in output.read_text().splitlines()]
    return printed, written


@pytest.fixture(scope="module")
def inference_records(tmp_path_factory):
    printed, written = _run_script("benchmarks.bench_inference", tmp_path_factory.mktemp("inference"))
    assert printed == written
    return written


@pytest.fixture(scope="module")
def training_records(tmp_path_factory):
    printed, written = _run_script("benchmarks.bench_training", tmp_path_factory.mktemp("training"))
    assert printed == written
    return written


def _by_name(records: list[dict]) -> dict[str, dict]:
    return {record["name"]: record for record in records if "name" in record}


def _check_header(header: dict, script: str) -> None:
    assert header["kind"] == "header" and header["script"] == script and header["mode"] == "tiny"
    assert header["device"] == "cpu" and header["machine"] and header["cpu_cores"] >= 1
    assert header["torch"] == torch.__version__
    assert header["date"][:2] == "20" and "T" in header["date"]


def _check_ceilings(records: dict[str, dict]) -> None:
    assert records["copy_bandwidth"]["unit"] == "B/s" and records["copy_bandwidth"]["value"] > 0
    assert records["matmul_throughput"]["unit"] == "FLOP/s" and records["matmul_throughput"]["value"] > 0
    assert records["matmul_throughput"]["dtype"] == "float32"


def test_inference_tiny_reports_every_figure(inference_records):
    _check_header(inference_records[0], "bench_inference")
    records = _by_name(inference_records)
    assert list(records) == [
        "copy_bandwidth", "matmul_throughput", "model", "prefill", "decode_batch1", "decode_batch8", "decode_batch32",
        "text_to_image_64", "text_to_image_128", "image_to_image_64", "peak_memory",
    ]
    _check_ceilings(records)
    assert records["model"]["parameters"] == sum(
        p.numel() for p in build_model(tiny_config(), torch.device("cpu"), torch.float32).parameters()
    )


def test_inference_tiny_ratios_are_limit_over_measured(inference_records):
    records = _by_name(inference_records)
    bandwidth, throughput = records["copy_bandwidth"]["value"], records["matmul_throughput"]["value"]
    timed = [r for r in records.values() if "seconds" in r]
    assert len(timed) == 7
    for record in timed:
        assert record["seconds"] > 0 and record["limit_seconds"] > 0 and record["flops"] > 0 and record["bytes"] > 0
        assert record["ratio"] == pytest.approx(record["limit_seconds"] / record["seconds"], rel=1e-12)
        # the floor is at least the pure-compute and the pure-memory time of the whole piece of work
        assert record["limit_seconds"] >= record["flops"] / throughput * (1 - 1e-9)
        assert record["limit_seconds"] >= record["bytes"] / bandwidth * (1 - 1e-9)
    memory = records["peak_memory"]
    assert memory["unit"] == "GiB" and memory["measured"] > memory["limit"] > 0
    assert memory["ratio"] == pytest.approx(memory["limit"] / memory["measured"], rel=1e-12)


def test_inference_tiny_decode_rows(inference_records):
    records = _by_name(inference_records)
    for batch in (1, 8, 32):
        record = records[f"decode_batch{batch}"]
        # 4x4 ViT grid: [vision_start, 16 patches, vision_end, bos, 40 text, eos, bos]
        assert record["context_tokens"] == 61 and record["new_tokens"] == 24 and record["batch"] == batch
        assert record["tokens"] == batch * 23
        assert record["tokens_per_s"] == pytest.approx(record["tokens"] / record["seconds"], rel=1e-12)
        assert record["limit_tokens_per_s"] == pytest.approx(record["tokens"] / record["limit_seconds"], rel=1e-12)
        assert record["end_to_end_seconds"] > record["prefill_and_first_token_seconds"] > 0
    assert records["prefill"]["context_tokens"] == 61 and records["prefill"]["image_tokens"] == 16


def test_inference_tiny_image_rows(inference_records):
    records = _by_name(inference_records)
    # 6 steps -> 5 Euler steps; shifted sigmas 1, .92, .82, .67, .43 all inside (0.4, 1] -> text CFG on every step
    for size, tokens in ((64, 16), (128, 64)):
        record = records[f"text_to_image_{size}"]
        assert (record["height"], record["width"], record["latent_tokens"]) == (size, size, tokens)
        assert record["euler_steps"] == 5 and record["model_calls"] == 10
        assert record["context_tokens"] == [42, 0, 42]
        assert record["cfg_text_scale"] == 4.0 and record["cfg_img_scale"] == 1.0 and record["cfg_interval"] == [0.4, 1.0]
    edit = records["image_to_image_64"]
    assert edit["model_calls"] == 15 and edit["cfg_renorm_type"] == "text_channel" and edit["cfg_img_scale"] == 2.0
    # [VAE block 16+2, ViT block 16+2, text 42] -> without the text: 36, without the images: 42
    assert edit["context_tokens"] == [78, 36, 42]


def test_training_tiny_reports_throughput_and_mfu(training_records):
    _check_header(training_records[0], "bench_training")
    records = _by_name(training_records)
    assert list(records) == ["copy_bandwidth", "matmul_throughput", "training_model", "training_throughput"]
    _check_ceilings(records)
    config = tiny_config()
    model_record = records["training_model"]
    assert model_record["trainable_parameters"] == accounting.model_geometry(config).total_params
    assert model_record["checkpointed_layers"] == 4  # 2 decoder layers + 2 SigLIP layers
    result = records["training_throughput"]
    assert len(result["step_seconds_all"]) == 3 and result["step_seconds"] == sorted(result["step_seconds_all"])[1]
    # rows: [vit 16+2, bos, text (40 | 24 | 56), eos, latent 16+2]
    assert result["tokens_per_step"] == 3 * (18 + 2 + 18) + 40 + 24 + 56
    assert result["padded_tokens_per_step"] == 3 * (38 + 56)
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / result["step_seconds"], rel=1e-12)
    mfu = result["model_flops_per_step"] / result["step_seconds"] / records["matmul_throughput"]["value"]
    assert result["mfu"] == pytest.approx(mfu, rel=1e-12) and 0 < result["mfu_6nd"] < result["mfu"]
    for key in ("loss_first", "loss_last", "ce_last", "mse_last"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert result["loss_last"] == pytest.approx(0.25 * result["ce_last"] + result["mse_last"], rel=1e-5)


def test_geometry_matches_the_built_model_and_the_release():
    config = tiny_config()
    geometry = accounting.model_geometry(config)
    model = build_model(config, torch.device("cpu"), torch.float32)
    params = dict(model.named_parameters())

    def count(predicate):
        return sum(p.numel() for name, p in params.items() if predicate(name))

    assert count(lambda n: "moe_gen" in n) == geometry.expert_params
    assert count(lambda n: n.startswith("model.language_model.")) == 2 * geometry.expert_params + geometry.embed_params
    assert count(lambda n: n.startswith("model.vision_tower.")) == geometry.vision_params
    assert count(lambda n: n.startswith("model.connector.")) == geometry.connector_params
    assert count(lambda n: n.startswith(("model.vae2llm", "model.time_embedder", "llm2vae"))) == geometry.latent_io_params
    # the released checkpoint: 14,607.3 M parameters with the two frozen sin-cos tables, 6,525.6 M per expert
    full = accounting.model_geometry(full_size_config())
    tables = (70 * 70 + 64 * 64) * 3584
    assert full.total_params + tables == 14_607_260_128 and round((full.total_params + tables) / 1e6, 1) == 14_607.3
    assert full.expert_params == 6_525_628_928
    assert (full.expert_params + full.lm_head_params) * 2 == 14_141_252_608  # active decode bytes per token in bf16
    assert accounting.model_geometry(training_config()).llm_params == 3_087_442_944


def test_prefill_flops_match_torch_flop_counter():
    """The matrix-product FLOPs of the accounting equal torch's count on a real forward (torch's counter does not see
    the CPU attention kernels, so the attention term is added from first principles)."""
    config = tiny_config()
    torch.manual_seed(0)
    model = build_model(config, torch.device("cpu"), torch.float32)
    inputs = BenchmarkInputs(config, tiny_image_processor(), torch.device("cpu"), text_tokens=40).understanding(64, 1)
    with FlopCounterMode(display=False) as counter:
        model(**inputs, use_cache=True, logits_to_keep=1)
    geometry = accounting.model_geometry(config)
    length, patches = inputs["input_ids"].shape[1], 16
    text, vision = config.text_config, config.vision_config
    attention = 4 * text.num_hidden_layers * text.hidden_size * length**2 + 4 * vision.num_hidden_layers * vision.hidden_size * patches**2
    flops, _ = accounting.prefill(geometry, [length], [patches], 4)
    assert counter.get_total_flops() == flops - attention


def test_flow_schedule_matches_the_model_calls():
    """The sampler's calls (rows per call) are exactly what the accounting assumes: one 3-row prefill, then the
    branches of `flow_schedule` per Euler step."""
    config = tiny_config()
    torch.manual_seed(0)
    model = build_model(config, torch.device("cpu"), torch.float32)
    calls = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    inputs = BenchmarkInputs(config, tiny_image_processor(), torch.device("cpu"), text_tokens=40).text_to_image()
    settings = dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.5, 1.0), timestep_shift=1.0)
    try:
        model.generate(**inputs, generation_mode="image", height=32, width=32, num_inference_steps=8, decode=False, **settings)
    finally:
        hook.remove()
    branches = accounting.flow_schedule(8, 1.0, (0.5, 1.0), use_text=True, use_image=False)
    assert branches == [2, 2, 2, 2, 1, 1, 1]  # sigmas 1, 6/7, ..., 1/7 without shift; CFG while sigma > 0.5
    assert calls == [(3, 42)] + [(rows, 2 * 2 + 2) for rows in branches]


def test_vae_flops_scale_with_pixels():
    config = tiny_config()
    small, large = (accounting.vae_flops(config, "decode", size, size) for size in (64, 128))
    assert small > 0 and large == pytest.approx(4 * small, rel=0.02)
    with pytest.raises(ValueError, match="'encode' or 'decode'"):
        accounting.vae_flops(config, "both", 64, 64)


def test_full_size_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="Run with --tiny"):
        resolve_device(None, tiny=False)
    assert resolve_device(None, tiny=True) == torch.device("cpu")


def test_decode_tokens_below_two_is_rejected(capsys):
    from benchmarks.bench_inference import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--tiny", "--decode-tokens", "1"])
    assert "--decode-tokens must be at least 2" in capsys.readouterr().err


def test_step_rows_prove_one_graph_and_no_host_synchronisation(tmp_path):
    """`--only decode_step denoise_step`: the static-cache decode step and the denoising step are one graph without
    breaks, compiled and eager agree, and neither step reads anything back to the host (the decode loop reads one
    value per token: transformers' stop check)."""
    printed, written = _run_script(
        "benchmarks.bench_inference", tmp_path, "--only", "decode_step", "denoise_step", "--variants", "eager",
        "compiled", "--compile-backend", "eager", "--step-size", "64",
    )
    assert printed == written
    rows = {(r["name"], r["variant"]): r for r in written if "variant" in r}
    assert set(rows) == {("decode_step", v) for v in ("eager", "static", "compiled")} | {
        ("denoise_step", v) for v in ("eager", "compiled")
    }
    static, compiled = rows["decode_step", "static"], rows["decode_step", "compiled"]
    assert (static["graphs"], static["graph_breaks"], static["forward_host_syncs"]) == (1, 0, 0)
    assert compiled["forward_host_syncs"] == 0 and compiled["loop_sync_kinds_per_token"] == {"aten::is_nonzero": 1.0}
    assert all(rows["decode_step", v]["tokens_equal_eager"] for v in ("eager", "static", "compiled"))
    eager_step = rows["denoise_step", "eager"]
    assert (eager_step["graphs"], eager_step["graph_breaks"], eager_step["step_host_syncs"]) == (1, 0, 0)
    assert rows["denoise_step", "compiled"]["loop_host_syncs_per_step"] == 0
    assert rows["denoise_step", "compiled"]["latents_max_abs_diff_to_eager"] <= 1e-5
    for row in rows.values():
        assert row.get("ms_per_token", row.get("ms_per_step")) > 0


def test_gpu_script_dry_run_prints_every_phase_and_runs_nothing(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, OUT=str(out))
    completed = subprocess.run(["bash", "benchmarks/run_gpu.sh", "--dry-run"], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    commands = [line for line in completed.stdout.splitlines() if line.startswith("+ [")]
    assert len(commands) == 3
    assert "--variants eager compiled" in commands[0] and "--only decode image_to_image text_to_image prefill" in commands[0]
    assert "--quantization nf4" in commands[1] and f"{out}/nf4.jsonl" in commands[1]
    assert "benchmarks.gpu_summary" in commands[2] and f"{out}/summary.jsonl" in commands[2]
    assert sorted(path.name for path in out.iterdir()) == []  # nothing ran


def test_gpu_script_refuses_an_unknown_argument():
    completed = subprocess.run(["bash", "benchmarks/run_gpu.sh", "--fast"], cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 2 and "unknown argument --fast" in completed.stderr


def test_gpu_summary_keeps_what_a_phase_cut_short_had_written(tmp_path):
    from benchmarks.gpu_summary import main as summarize_files

    bf16 = tmp_path / "bf16.jsonl"
    header = {"kind": "header", "machine": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "transformers": "5.23.0", "date": "d"}
    timed = {"name": "decode_batch1_compiled", "seconds": 1.5, "limit_seconds": 1.2, "ratio": 0.8, "tokens_per_s": 170.7,
             "original_h100": 9.5, "target": 170.0, "meets_target": True, "flops": 1.0}
    memory = {"name": "peak_memory", "measured": 30.0, "limit": 27.6, "ratio": 0.92, "unit": "GiB"}
    bf16.write_text("\n".join(json.dumps(r) for r in (header, timed, memory)) + '\n{"name": "text_to_ima')
    lines = summarize_files([str(bf16), str(tmp_path / "nf4.jsonl"), "--output", str(tmp_path / "summary.jsonl")])
    assert lines[0] == {"file": "bf16", "machine": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "transformers": "5.23.0", "date": "d"}
    assert lines[1] == {"file": "bf16", **{k: v for k, v in timed.items() if k != "flops"}}
    assert lines[2] == {"file": "bf16", **memory}
    assert len(lines) == 3
    assert [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()] == lines


@pytest.mark.parametrize(
    ("short", "long", "expected"),
    [
        ([0.50, 0.52], [1.60, 1.70], 110.0),  # quiet machine: the fastest run of each length
        ([0.50, 1.90], [1.60, 1.65], 110.0),  # a load spike on one short run: its pair alone would give −25 ms
        ([0.90, 0.50], [1.60, 4.00], 110.0),  # the fastest runs need not come from the same repeat
    ],
)
def test_ms_per_unit_takes_the_fastest_run_of_each_length(short, long, expected):
    from benchmarks.steps import ms_per_unit

    assert ms_per_unit(short, long, 1, 11) == pytest.approx(expected)
