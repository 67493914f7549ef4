"""Builds the model cards of UniMedVL (converted 14B release) and UniMedVL-Tiny with `huggingface_hub.ModelCard`.

    python model_cards/build_model_cards.py [--output-dir model_cards] [--tiny-results results.json] \
        [--tiny-build build_summary.json] [--tiny-evaluation evaluation.json --tiny-grid UniMedVL-Tiny-samples.png] [--record]

Writes `UniMedVL-14B.md` and `UniMedVL-Tiny.md` (each becomes a repository's README.md when published with
`model_cards/publish.py`). Figures in the 14B card are those reported by the UniMedVL authors, labelled as such; the
Tiny card takes measured results from a JSON file `{"metric name": {"value": v, "baseline": b, "dataset": d}}`.
Each Tiny input left out is read from its committed record (`records/`); `--record` stores the given ones there.
"""

import argparse
import json
import pathlib

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling_unimedvl.atomic_files import write_json


CARDS_DIR = pathlib.Path(__file__).resolve().parent
RECORDS_DIR = CARDS_DIR / "records"
"""The JSON files the committed UniMedVL-Tiny card is built from, so that `python model_cards/build_model_cards.py`
rebuilds the committed cards from the repository alone (a fresh machine has no build or evaluation outputs)."""
TINY_RECORDS = {
    "results": "UniMedVL-Tiny.results.json",
    "build": "UniMedVL-Tiny.build_summary.json",
    "evaluation": "UniMedVL-Tiny.evaluation.json",
}
"""Record kind → file name in `RECORDS_DIR`: `card_results` of the evaluation, the build script's `build_summary.json`,
the evaluation's `evaluation.json`."""

OUT_OF_SCOPE = (
    "UniMedVL is a research model. It is **not a medical device** and must not be used for diagnosis, triage, "
    "treatment decisions or any clinical decision making, nor to produce images that stand in for real patient "
    "data. Generated images are synthetic: never use them as ground truth, as evidence in a record, or to train "
    "diagnostic models without expert review. Outputs can be fluent and wrong (hallucinated findings, confused "
    "modalities or laterality)."
)
LIMITATIONS = (
    "- Hallucinated or omitted findings in answers and reports; confident answers to questions outside its data.\n"
    "- Modality and body-region confusion, especially for rare modalities and for images unlike its training data.\n"
    "- Generated images can look plausible while being anatomically wrong; they inherit the biases of the training "
    "data (institutions, scanners, populations, the over-representation of chest X-rays and common pathologies).\n"
    "- English prompts only; no patient-level reasoning across studies; no guarantee of calibration."
)
RECOMMENDATIONS = (
    "Keep a qualified human in the loop, evaluate on your own data and population before any use, report the "
    "evaluation settings (see the evaluation harness, `unimedvl eval`), and label every generated image as synthetic."
)
GET_STARTED = """```python
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True, dtype=torch.bfloat16)
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
inputs = processor(images=image, text="What abnormality is seen in this chest X-ray?")
ids = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode_answers(ids[:, inputs["input_ids"].shape[1]:])[0])

inputs = processor(text="Axial brain MRI, T2-weighted.", generation_mode="image")
image = model.generate(**inputs, generation_mode="image", height=512, width=512).images  # [1, 3, H, W] in [-1, 1]
```"""
TINY_GET_STARTED = """```python
import torch
from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor, default_model_path
from modeling_unimedvl.default_model import TINY_IMAGE_TO_IMAGE, TINY_TEXT_TO_IMAGE
from unimedvl_pipelines import load_medical_image

path = default_model_path()  # shipped inside the package; or the Hub id "{repo}" with trust_remote_code=True
model = UniMedVLForConditionalGeneration.from_pretrained(path).eval()
processor = UniMedVLProcessor.from_pretrained(path)
inputs = processor(images=load_medical_image("scan.dcm"), text="What modality is this image?")
ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print(processor.decode_answers(ids[:, inputs["input_ids"].shape[1]:])[0])  # e.g. "CT"

inputs = processor(text="MR, sagittal, head", generation_mode="image")  # modality, plane, body region
image = model.generate(**inputs, generation_mode="image", **TINY_TEXT_TO_IMAGE).images  # [1, 3, 64, 64] in [-1, 1]

inputs = processor(images=blurry_64px_image, text="Increase the resolution of this image by a factor of two.",
                   generation_mode="image")
sharper = model.generate(**inputs, generation_mode="image", **TINY_IMAGE_TO_IMAGE).images
```

Without this package: `AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(path, trust_remote_code=True)` load the same classes from the code files in the folder."""
CITATION = """@misc{unimedvl,
  title        = {UniMedVL: Unifying Medical Multimodal Understanding and Generation},
  author       = {{General Medical AI (uni-medical)}},
  howpublished = {\\url{https://github.com/uni-medical/UniMedVL}},
}
@article{bagel,
  title   = {Emerging Properties in Unified Multimodal Pretraining},
  author  = {Deng, Chaorui and others},
  journal = {arXiv preprint arXiv:2505.14683},
  year    = {2025},
}"""

REPORTED_VQA = {"VQA-RAD": 61.9, "SLAKE": 75.4, "PathVQA": 53.5, "OmniMedVQA": 85.8, "GMAI-MMBench": 60.75}
REPORTED_T2I = {
    "CFP": (53.20, 0.708), "CXR": (73.04, 0.702), "CT": (73.04, 0.696), "HIS": (149.01, 0.704),
    "MRI": (90.36, 0.706), "OCT": (99.27, 0.721), "Ultrasound": (95.38, 0.706), "Endoscopy": (133.11, 0.707),
}
REPORTED_I2I = {
    "Virtual IHC staining H&E → IHC": (20.27, 0.456),
    "MRI super-resolution 4×": (27.29, 0.890),
    "Cross-modal T2 ↔ FLAIR (average)": (25.07, 0.882),
}


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def release_card(repo_id: str = "General-Medical-AI/UniMedVL") -> ModelCard:
    """Card of the converted 14B release; evaluation figures are the authors' reported numbers."""
    card_data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="any-to-any",
        base_model="ByteDance-Seed/BAGEL-7B-MoT",
        tags=["medical", "radiology", "pathology", "vision-language", "image-generation", "unimedvl", "custom_code"],
        eval_results=[
            EvalResult(
                task_type="visual-question-answering", dataset_type=name.lower(), dataset_name=name,
                metric_type="accuracy", metric_value=value, source_name="UniMedVL README (reported)",
                source_url="https://github.com/uni-medical/UniMedVL",
            )
            for name, value in REPORTED_VQA.items()
        ],
        model_name="UniMedVL",
        extra_gated_prompt="Research use only. Not for clinical diagnosis or treatment decisions.",
    )
    results = "\n\n".join([
        "All figures below are **reported by the UniMedVL authors** (README); this package has not re-measured them.",
        "Medical VQA accuracy (%):\n\n" + _table(list(REPORTED_VQA), [list(REPORTED_VQA.values())]),
        "Text-to-image, gFID ↓ / BiomedCLIP score ↑:\n\n"
        + _table(["modality", "gFID", "BiomedCLIP"], [[k, *v] for k, v in REPORTED_T2I.items()]),
        "Image-to-image, PSNR ↑ / SSIM ↑:\n\n" + _table(["task", "PSNR", "SSIM"], [[k, *v] for k, v in REPORTED_I2I.items()]),
    ])
    return ModelCard.from_template(
        card_data,
        model_id="UniMedVL (transformers format)",
        model_summary=(
            "A unified medical vision-language model that answers questions about medical images, writes reports, "
            "and generates medical images from text or from other images, converted to native transformers classes."
        ),
        model_description=(
            "14.6 B-parameter Mixture-of-Transformers (BAGEL architecture): a Qwen2.5-7B understanding expert and an "
            "equally sized generation expert sharing one attention, a 26-layer SigLIP-so400m NaViT encoder with an MLP "
            "connector, the FLUX.1 VAE (16 channels, 2×2 latent patches) and a rectified-flow velocity head. Converted "
            "with `python -m modeling_unimedvl.convert`, numerically identical to the original implementation."
        ),
        developers="General Medical AI (uni-medical); transformers port by the UniMedVL-HF project",
        model_type="Unified multimodal (image-text-to-text and text/image-to-image)",
        license="apache-2.0",
        base_model="ByteDance-Seed/BAGEL-7B-MoT",
        repo="https://github.com/uni-medical/UniMedVL",
        direct_use="Research on medical visual question answering, report drafting and medical image synthesis "
        "(text-to-image in 8 modalities, super-resolution, T2↔FLAIR translation, H&E→IHC virtual staining, "
        "counterfactual generation).",
        downstream_use="Fine-tuning (LoRA/QLoRA on either expert) on de-identified institutional data for research.",
        out_of_scope_use=OUT_OF_SCOPE,
        bias_risks_limitations=LIMITATIONS,
        bias_recommendations=RECOMMENDATIONS,
        get_started_code=GET_STARTED.format(repo=repo_id),
        training_data="UniMed-5M (5.6 M+ samples; CFP, CXR, CT, histopathology, MRI, OCT, ultrasound, endoscopy), "
        "released gated as General-Medical-AI/UniMedVL-5M. Initialised from BAGEL-7B-MoT.",
        training_regime="Three-stage progressive curriculum, bf16: stage 1 foundation (85K steps; 75 % image→text, "
        "25 % text→image), stage 2 instruction tuning (120K; 40 / 45 / 10 % interleaved), stage 3 unified "
        "(70K; 37 / 35 / 25 %). Loss 0.25 · cross-entropy + 1.0 · flow-matching MSE.",
        results=results,
        citation_bibtex=CITATION,
    )


TINY_RECIPE = (
    "Built from scratch on the CPU by one reproducible command (each step checkpoints; re-running the command "
    "resumes and ends with the same weights, bit for bit, on the same machine; on another CPU the vision step's "
    "floating-point results, and so the weights, can differ):\n\n"
    "```bash\n{command}\n```\n\n"
    "Seed {seed}; machine: {machine}; torch threads {threads}. Wall times: tokenizer {tokenizer_s} s, VAE {vae_s} s, "
    "vision encoder {vision_s} s{stage0_together}, data {data_s} s, curriculum stage 1 {stage1_s} s, stage 2 {stage2_s} s, stage 3 "
    "{stage3_s} s, generation fine-tune {generation_finetune_s} s (total {total_min} min).\n\n"
    "- **Data**: training splits only — VQA-RAD train (without the one image that is also a MedPix dev image) and "
    "MedPix 2.0 train. Nothing of VQA-RAD test or MedPix dev is seen by any step.\n"
    "- **Tokenizer**: byte-level BPE trained with `tokenizers` on the training text only (VQA-RAD train questions and "
    "answers, MedPix 2.0 train captions, labels and case text, the prompt templates); {vocab} tokens, Qwen2 "
    "pre-tokenizer, the UniMedVL special tokens at ids 0–6.\n"
    "- **VAE (stage 0a)**: the FLUX autoencoder layout (same diffusers block types) at its own geometry — "
    "{vae_levels} levels = {downsampling}× downsampling, {latent_channels} latent channels, widths {vae_channels}, "
    "{vae_parameters} parameters, {patch_side}×{patch_side} latent patches per generation token — trained on the "
    "training images at {image_size} px (L1 + MSE + {kl_weight:g} KL, {vae_steps} steps of {vae_batch} {vae_views}); "
    "`scaling_factor` {scale:.4f} / "
    "`shift_factor` {shift:.4f} from its latent statistics. Reconstruction PSNR on training images {vae_psnr} dB "
    "(2× bicubic: {vae_bicubic} dB).\n"
    "- **Vision encoder (stage 0b)**: the model's SigLIP NaViT, connector and position table pretrained with linear "
    "heads (discarded afterwards) on the training labels — MedPix modality, body region, plane and VQA-RAD organ — "
    "on random crops, flips, small rotations and contrast / gamma changes, {vision_steps} steps of {vision_batch} "
    "images.\n"
    "- **Model**: Qwen2 experts hidden {hidden}, {layers} layers, {heads} heads ({kv_heads} KV), MLP {mlp}; SigLIP "
    "NaViT hidden {vit_hidden}, {vit_layers} layers, patch {patch}, images ≤ {understanding_side} px; generation at "
    "{image_size} px ({tokens} latent tokens); {params} parameters, float32 ({megabytes} MB of safetensors).\n"
    "- **Curriculum**: the package's stages 1, 2, 3 (`unimedvl_training.curriculum.run_curriculum`, shipped "
    "loss weights; {frozen}) with LR {learning_rate} (constant, cosine in stage 3), batch {batch}, {steps} steps; "
    "mixtures understanding / text-to-image / image-to-image {mixtures} %. Understanding: VQA-RAD train questions "
    "(a few per conversation; each image's questions in {vqa_rounds} random groupings), a region question per VQA-RAD "
    "train image (its organ label), MedPix train modality / region / plane questions with a yes/no and an either-or "
    "question on the same labels (\"Is this a CT or an MRI image?\") on {num_views} views (the whole image, random crops, flips, contrast changes) of each image, and each "
    "MedPix caption as the answer to the report prompt; text-to-image: MedPix train images from label prompts "
    "(\"CT, axial, head\") and captions; image-to-image: 2× super-resolution of every MedPix train image.\n"
    "- **Generation fine-tune**: then {finetune_steps} steps on generation rows only, text-to-image / image-to-image "
    "{finetune_mixture} % ({finetune_frozen}; text-to-image rows from the {finetune_prompts}), cosine LR from "
    "{finetune_lr}: the stages give super-resolution too few rows to beat bicubic, and the text-to-image rows keep the "
    "prompt trained. Loss (first → last 10 logged steps): {curves}."
)


def mixture_shares(mixtures: list[dict], groups: tuple[str, ...] | None = None) -> str:
    """`"75 / 25 / 0, 40 / 45 / 11"`: each stage's normalised share (%) of `groups` (default: the curriculum's
    `DATA_GROUPS`, understanding, text-to-image, image-to-image)."""
    from unimedvl_training.curriculum import DATA_GROUPS

    groups = groups or DATA_GROUPS
    stages = []
    for mixture in mixtures:
        total = sum(float(mixture.get(group, 0)) for group in groups)
        stages.append(" / ".join(f"{100 * float(mixture.get(group, 0)) / total:.0f}" for group in groups))
    return ", ".join(stages)


FREEZE_NAMES = {
    "vit": "ViT", "vae": "VAE", "und": "understanding expert", "gen": "generation expert", "connector": "ViT connector",
}
"""Card names of the curriculum's `freeze` keys."""


def frozen_and_trained(freeze: dict) -> str:
    """`"frozen: ViT, VAE; trained: understanding expert, generation expert"` from a stage's `freeze` map."""
    frozen = [FREEZE_NAMES[name] for name, is_frozen in freeze.items() if is_frozen]
    trained = [FREEZE_NAMES[name] for name, is_frozen in freeze.items() if not is_frozen]
    return f"frozen: {', '.join(frozen) or 'nothing'}; trained: {', '.join(trained) or 'nothing'}"


def tiny_recipe(build: dict) -> str:
    """The training-recipe paragraph of the Tiny card from the build script's `build_summary.json`."""
    timings, vae, text, vision = build["timings_s"], build["vae"], build["text_config"], build["vision_config"]
    finetune = build["generation_finetune"]
    curves = "; ".join(
        f"{stage['stage']} "
        + (f"CE {stage['ce']['first10_mean']} → {stage['ce']['last10_mean']}, " if stage["ce"]["first10_mean"] else "")
        + f"MSE {stage['mse']['first10_mean']} → {stage['mse']['last10_mean']}"
        for stage in build["stages"]
    )
    together = build.get("stage0_in_parallel", False)
    total_s = sum(timings.values()) - (min(timings.get("vae_s", 0), timings.get("vision_s", 0)) if together else 0)
    patch_side = build.get("latent_patch_size", 2)
    tokens = (build["image_size"] // (vae["downsampling"] * patch_side)) ** 2
    crop = vae["train_crop"]
    return TINY_RECIPE.format(
        command=build["command"], seed=build["seed"], machine=build.get("machine", "2-core CPU dev box"),
        threads=build.get("torch_threads", "?"), vocab=build.get("vocab_size", "?"),
        vae_levels=len(vae["block_out_channels"]), downsampling=vae["downsampling"], latent_channels=vae["latent_channels"],
        vae_channels=tuple(vae["block_out_channels"]), vae_parameters=f"{vae['parameters']:,}", image_size=build["image_size"],
        vae_steps=vae["steps"], vae_batch=vae["batch_size"], scale=vae["scaling_factor"], patch_side=patch_side,
        vae_views="whole images" if crop >= build["image_size"] else f"random {crop}-px crops", kl_weight=vae["kl_weight"],
        frozen=frozen_and_trained(build.get("freeze", {"vit": True, "vae": True})),
        shift=vae["shift_factor"], vae_psnr=vae["train_psnr"], vae_bicubic=vae["train_psnr_2x_bicubic"],
        vision_steps=build["vision"]["steps"], vision_batch=build["vision"]["batch_size"],
        hidden=text["hidden_size"], layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
        kv_heads=text["num_key_value_heads"], mlp=text["intermediate_size"], vit_hidden=vision["hidden_size"],
        vit_layers=vision["num_hidden_layers"], patch=vision["patch_size"], understanding_side=build["understanding_side"],
        tokens=tokens, params=f"{build.get('parameters', 0):,}", megabytes=build.get("megabytes", "?"),
        learning_rate=build["learning_rate"], batch=build["batch_size"],
        steps=" / ".join(str(s) for s in build.get("stage_steps", [])), mixtures=mixture_shares(build["stage_mixtures"]), curves=curves, num_views=build.get("num_views", 1),
        total_min=round(total_s / 60), vae_s=timings.get("vae_s", "?"),
        stage0_together=" (both at the same time, one process each)" if together else "",
        finetune_steps=finetune["steps"], finetune_lr=finetune["learning_rate"], finetune_frozen=frozen_and_trained(finetune["freeze"]),
        finetune_mixture=mixture_shares([finetune["mixture"]], groups=("text_to_image", "interleaved")),
        finetune_prompts="label prompts only" if "text_to_image" in finetune else "label prompts and captions",
        vqa_rounds=build.get("vqa_rounds", "?"),
        **{k: timings.get(k, "?") for k in ("tokenizer_s", "vision_s", "data_s", "stage1_s", "stage2_s", "stage3_s", "generation_finetune_s")},
    )


def _metric_type(name: str) -> str:
    lowered = name.lower()
    return "psnr" if "psnr" in lowered else "ssim" if "ssim" in lowered else "recall" if "recall" in lowered else "accuracy"


TINY_GRID = """### Generated images

![UniMedVL-Tiny text-to-image samples]({path})

One row per prompt, one column per seed (0–3), {steps} steps, text guidance {guidance}; each image is {size} × {size}
px, shown enlarged 2× (nearest neighbour). What the label classifier of the evaluation (modality, region) says about
each row:

{verdicts}"""


def tiny_grid(grid: dict, path: str) -> str:
    """The card section with the grid picture (`path`, relative to the card) and the classifier's verdicts per row."""
    sampling = grid.get("sampling", {})
    verdicts = _table(
        ["prompt", "modality (seeds 0–3)", "region (seeds 0–3)"],
        [[prompt, ", ".join(v["modality"]), ", ".join(v["region"])] for prompt, v in grid["classified"].items()],
    )
    return TINY_GRID.format(
        path=path, steps=sampling.get("num_inference_steps", "?"), guidance=sampling.get("cfg_text_scale", "?"),
        size=grid.get("size", 64), verdicts=verdicts,
    )


def tiny_card(
    results: dict | None = None, repo_id: str = "unimedvl/UniMedVL-Tiny", build: dict | None = None,
    grid: dict | None = None, grid_path: str | None = None,
) -> ModelCard:
    """Card of UniMedVL-Tiny with the measured held-out results (metric → value, baseline, dataset and, where the
    issue set one, target), given the build script's summary (`build`) its training recipe, and given the
    evaluation's grid (`grid`, `grid_path` relative to the card) the generated images."""
    results = results or {}
    card_data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="any-to-any",
        tags=["medical", "unimedvl", "tiny", "custom_code"],
        datasets=["VQA-RAD", "MedPix-2.0"],
        eval_results=[
            EvalResult(
                task_type="visual-question-answering", dataset_type="medical", dataset_name=entry["dataset"],
                metric_type=_metric_type(name), metric_name=name, metric_value=entry["value"],
            )
            for name, entry in results.items()
        ] or None,
        model_name="UniMedVL-Tiny",
        extra_gated_prompt="Research and teaching use only. Not for clinical use.",
    )
    table = (
        _table(
            ["metric", "dataset", "UniMedVL-Tiny", "baseline", "target"],
            [[k, v["dataset"], v["value"], v["baseline"], v.get("target", "—")] for k, v in results.items()],
        )
        if results
        else "Not evaluated yet."
    )
    if results:
        table = (
            "Held-out data only (VQA-RAD test, MedPix 2.0 dev), measured with "
            "`python -m unimedvl_training.evaluate_unimedvl_tiny` (the package's evaluation harness). Baselines: the "
            "training split's majority answer / class; for generated images, the majority class of the prompts "
            "(a label classifier trained on MedPix train judges the images; its accuracy on the real dev images is "
            "given beside); for super-resolution, the bicubic input (every output goes through the VAE, whose own "
            "reconstruction of the targets is given too). Targets: those of the project's issue for this model; a "
            "value below its target is not reached.\n\n"
            + table
        )
    if grid and grid_path:
        table += "\n\n" + tiny_grid(grid, grid_path)
    return ModelCard.from_template(
        card_data,
        model_id="UniMedVL-Tiny",
        model_summary="A small UniMedVL (same architecture, a few million parameters) trained from scratch by this "
        "package's own 3-stage curriculum, shipped as the offline default for the quickstart, demo and examples.",
        model_description="Same Mixture-of-Transformers architecture as UniMedVL at a tiny size, with a tokenizer "
        "trained on the training text. It exists to make every entry point runnable offline; it is not a useful "
        "medical model.",
        developers="UniMedVL-HF project",
        model_type="Unified multimodal (image-text-to-text and text/image-to-image)",
        license="apache-2.0",
        direct_use="Smoke tests, teaching, demos of the API.",
        out_of_scope_use=OUT_OF_SCOPE,
        bias_risks_limitations=LIMITATIONS,
        bias_recommendations=RECOMMENDATIONS,
        get_started_code=TINY_GET_STARTED.format(repo=repo_id),
        training_data="VQA-RAD training questions (CC0) and MedPix 2.0 training images and captions (research use).",
        training_regime=tiny_recipe(build) if build else None,
        results=table,
        citation_bibtex=CITATION,
    )


def read_tiny_records(paths: dict[str, str | None], record: bool = False) -> dict[str, dict | None]:
    """The Tiny card's JSON inputs (`TINY_RECORDS` kinds → a path, or None for the committed record where there is one);
    with `record`, each given file is also stored as the committed record (`RECORDS_DIR`)."""
    records = {}
    for kind, name in TINY_RECORDS.items():
        path = paths.get(kind) or (RECORDS_DIR / name if (RECORDS_DIR / name).is_file() else None)
        records[kind] = json.loads(pathlib.Path(path).read_text()) if path else None
        if record and paths.get(kind):
            RECORDS_DIR.mkdir(exist_ok=True)
            write_json(str(RECORDS_DIR / name), records[kind], indent=1)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=str(CARDS_DIR))
    parser.add_argument("--tiny-results", help="JSON file with UniMedVL-Tiny's measured results (default: the committed record)")
    parser.add_argument("--tiny-build", help="build_summary.json of unimedvl_training.build_unimedvl_tiny (training recipe; default: the committed record)")
    parser.add_argument("--tiny-evaluation", help="evaluation.json of unimedvl_training.evaluate_unimedvl_tiny (its grid; default: the committed record)")
    parser.add_argument("--tiny-grid", default="UniMedVL-Tiny-samples.png", help="the grid picture, relative to the card")
    parser.add_argument("--record", action="store_true", help=f"store the given JSON files as the committed records ({RECORDS_DIR.name}/)")
    args = parser.parse_args(argv)
    output = pathlib.Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    records = read_tiny_records({"results": args.tiny_results, "build": args.tiny_build, "evaluation": args.tiny_evaluation}, args.record)
    release_card().save(output / "UniMedVL-14B.md")
    evaluation = records["evaluation"] or {}
    tiny_card(records["results"], build=records["build"], grid=evaluation.get("grid"), grid_path=args.tiny_grid).save(output / "UniMedVL-Tiny.md")
    print(f"wrote {output / 'UniMedVL-14B.md'} and {output / 'UniMedVL-Tiny.md'}")


if __name__ == "__main__":
    main()
