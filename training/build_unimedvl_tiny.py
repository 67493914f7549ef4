"""Builds UniMedVL-Tiny from scratch on the CPU: tokenizer, VAE, vision encoder, the three curriculum stages, a
generation fine-tune.

    python -m unimedvl_training.build_unimedvl_tiny --data ../shared/data --output outputs/unimedvl_tiny --seed 0 \
        --threads 2 --ship

Steps (each writes its result atomically and is skipped when that result exists; the long ones save a checkpoint
every few hundred steps and continue from it, so a killed build re-run with the same command resumes and ends with
the same weights, bit for bit, as an uninterrupted one on the same machine; on another machine the vision step came
out different (2026-12-08: same code, seed and locked versions, tokenizer and VAE byte-identical, every ViT tensor not)):

0. **Tokenizer** — a byte-level BPE (`tokenizers`, Qwen2 pre-tokenizer) trained on the *training* text only: VQA-RAD
   train questions/answers, MedPix train captions/labels/case text and the prompt templates below; the UniMedVL special
   tokens get ids 0–6. Saved as a `Qwen2Tokenizer` (tokenizer.json + tokenizer_config.json).
1. **Model** — a fresh `UniMedVLConfig` at small size (`TEXT_CONFIG`, `VISION_CONFIG`, `VAE_GEOMETRY`), randomly
   initialised, with the processor at the Tiny resolutions.
2. **Vision encoder** (stage 0b) — the original starts from a pretrained SigLIP; there is none at this size, so the
   model's own SigLIP NaViT (+ connector and position table) is pretrained on the training images with linear heads
   for the labels the data carries (MedPix modality / body region / plane, VQA-RAD organ), on random crops, flips,
   small rotations and contrast / gamma changes of each image (`augmented_view`). The heads are discarded.
3. **VAE** (stage 0a) — the original uses the pretrained FLUX VAE; there is none at this size, so a diffusers
   `AutoencoderKL` with the FLUX layout (same block types, `VAE_GEOMETRY`: 2 levels = 2× downsampling, 4 latent
   channels) is trained on MedPix train + VQA-RAD train images, whole, at 64 px (L1 + MSE + small KL). Its latent
   mean / std set `shift_factor` / `scaling_factor` as FLUX does (`(z − shift)·scale` ≈ unit variance). 2× (not 8×)
   so that reconstructions keep the detail 2× super-resolution needs; 4×4 latent patches
   (`LATENT_PATCH_SIZE`) keep a 64-px image at 64 generation tokens. Steps 2 and 3 are independent of each other:
   with `--threads` ≥ 2 they run at the same time in two processes (`pretrain_in_parallel`), each with half the
   threads.
4. **Start model** — the model of step 2 with the VAE of step 3 inside (`assemble_start_model`).
5. **Curriculum** — the project's stages 1, 2, 3 (`run_curriculum`, shipped stage configs + `curriculum_config`
   overrides: steps, LR, batch, small resolutions; ViT and VAE frozen as in the original: trained on at the
   curriculum's LR, the pretrained ViT loses what it learnt) on: understanding = VQA-RAD
   train questions (several per conversation), a region question per VQA-RAD train image (organ label), MedPix train
   modality / region / plane questions with a yes/no and an either-or question on the same labels
   (`medpix_choice_questions`; one conversation per view, questions in random order) on `num_views` views of each
   image, and MedPix captions as answers to the report prompt; text-to-image = MedPix train images from label
   prompts ("CT, axial, head") and captions; image-to-image = 2× super-resolution of every MedPix train image. Stage 3
   takes a larger share of image-to-image rows than the paper's (`STAGE_MIXTURES`).
6. **Generation fine-tune** — super-resolution rows and text-to-image rows from the label prompts only
   (`label_prompt_data`), understanding expert and ViT connector frozen (`GENERATION_FINETUNE`,
   `generation_finetune_config`): the stages give super-resolution too few rows to beat bicubic.
7. **Final folder** (`OUTPUT/final`): config with `auto_map`, `model.safetensors` (float32), tokenizer, processor,
   generation config and the package's model code, written by `save_pretrained` — loadable with `from_pretrained`,
   the `Auto*` classes and `trust_remote_code=True` without this package (Hub-ready). With `--ship` it is installed
   as the package's default model `modeling_unimedvl/unimedvl_tiny/`; `refresh_code_files` (or
   `python -m unimedvl_training.build_unimedvl_tiny --refresh-code`) re-copies the current model code into it.

The VAE and vision steps follow cosine schedules over fixed horizons (`SCHEDULE_STEPS`): `--vae-steps` /
`--vision-steps` below them stop early on the same schedule, so a short build is the first part of a longer one.

Data is read in place from `--data` (never copied); derived JSONL files, resized views and super-resolution pairs go
to `OUTPUT/data`. Held-out data is never used: not VQA-RAD test, not MedPix dev, and not the VQA-RAD images that are
also MedPix dev images (one image, `held_out_synpics`).
"""

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time

from PIL import Image, ImageEnhance, ImageOps

from modeling_unimedvl.atomic_files import staged_folder, write_json

from .run_tiny_curriculum import read_jsonl, sr_pair, summarize, write_jsonl


logger = logging.getLogger(__name__)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|latent_pad|>",
)
"""Special tokens, in id order (0–6): the pad/end-of-text token, then everything the processor and config look up."""

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""The Qwen2 pre-tokenizer split (digits one by one), as in the release tokenizer."""

MODALITY_QUESTION = "What modality is this image?"
REGION_QUESTION = "Which body region is shown?"
PLANE_QUESTION = "In which plane was this image taken?"
SR_INSTRUCTION = "Increase the resolution of this image by a factor of two."
REPORT_PROMPT = (
    "Please analyze this medical image using professional medical knowledge and provide a detailed radiological "
    "report with findings and diagnostic opinions."
)
"""The report instruction of the CLI and the demo (`unimedvl_pipelines.cli.REPORT_PROMPT`); MedPix captions answer it."""

REGIONS = {
    "Head": "head",
    "Spine and Muscles": "spine and muscles",
    "Thorax": "thorax",
    "Abdomen": "abdomen",
    "Reproductive and Urinary System": "reproductive and urinary system",
}
"""MedPix `Location Category` → the region word used in questions, answers and generation prompts."""
VQA_RAD_ORGANS = {"HEAD": "head", "CHEST": "thorax", "ABD": "abdomen"}
"""VQA-RAD `image_organ` → the region word of the MedPix region questions."""
PLANES = {"Axial": "axial", "Transverse": "axial", "Coronal": "coronal", "Sagittal": "sagittal"}
"""MedPix `Plane` → plane word; every other plane value becomes `other`."""
MODALITY_NAMES = ("CT", "MR")
REGION_NAMES = tuple(REGIONS.values())
PLANE_NAMES = ("axial", "coronal", "sagittal")

IMAGE_SIZE = 64
"""Generation resolution (VAE training, text-to-image, super-resolution): 64 px → 32×32 latents → 8×8 = 64 tokens."""
UNDERSTANDING_SIDE = 112
VIT_PATCH = 14
IMAGE_TRANSFORMS = {
    "understanding": [UNDERSTANDING_SIDE, UNDERSTANDING_SIDE // 2, VIT_PATCH, UNDERSTANDING_SIDE**2],
    "generation_vit": [UNDERSTANDING_SIDE, UNDERSTANDING_SIDE // 2, VIT_PATCH, UNDERSTANDING_SIDE**2],
    "generation_vae": [IMAGE_SIZE, 32, 16, IMAGE_SIZE * IMAGE_SIZE],
}
"""(max long side, min short side, stride, max pixels): ViT images ≤ 112 px, generation images ≤ 64 px."""
SR_TRANSFORM = tuple(IMAGE_TRANSFORMS["generation_vae"])
"""Size rule of the super-resolution pairs: the generation size."""

TEXT_CONFIG = {
    "hidden_size": 160,
    "intermediate_size": 640,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "hidden_act": "silu",
}
VISION_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "patch_size": VIT_PATCH,
    "image_size": UNDERSTANDING_SIDE,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
VAE_GEOMETRY = {
    "block_out_channels": (16, 32),
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 16,
}
"""The Tiny VAE: FLUX block types (mid-block attention included), 2 levels (2× downsampling), 4 latent channels,
small widths. A 4×-downsampling VAE of this size stays near 26 dB on whole 64-px images after 1,500 steps, barely
above 2× bicubic upscaling (26.2 dB on training images), so super-resolution through it could not beat bicubic; at 2×
it is not the bottleneck. 4 channels (one latent value per pixel of a grey image) keep a generation token at
4² × 4 = 64 values, below the decoder's width (160): with 16 channels (256 values a token) the flow-matching loss
stayed at 0.65 and generated images were noise, though that VAE reconstructed at 31 dB."""
LATENT_PATCH_SIZE = 4
"""Latent patch side per generation token: 4×4 patches of the 2× latents keep 64 tokens (8×8) for a 64-px image, the
token count of the FLUX geometry's 2×2 patches of 8× latents at 128 px (config `latent_patch_size`)."""
VAE_CROP = IMAGE_SIZE
"""The VAE trains on whole 64-px images: trained on 32-px crops, its mid-block attention and group norms do not carry
over to whole images (20.7 dB on whole images against 26.7 dB on crops)."""
SCHEDULE_STEPS = {"vae": 1100, "vision": 6000}
"""Horizons of the cosine LR schedules of the VAE and vision steps: `--vae-steps` / `--vision-steps` below them stop
early on the same schedule, so a shorter run is exactly the first part of the full one. Vision: a linear probe of the
pooled ViT features (MedPix train → dev, each figure the best of three L2 weights) reads modality / region / plane
87.3 / 57.4 / 79.6 % after 6,000 steps against 85.3 / 55.3 / 75.1 % after 3,000; 3,000 steps at 168 px instead of
112 px gave 83.2 / 57.9 / 69.6 %."""
VAE_STATISTICS_IMAGES = 512
"""Training images (a fixed random subset) whose latents set the scaling / shift factors and whose reconstruction
PSNR the report gives."""

STAGE_MIXTURES = {3: {"understanding": 0.3, "text_to_image": 0.3, "interleaved": 0.4}}
"""Tiny's override of the shipped stage mixtures (stages 1 and 2 keep the paper's): a larger stage-3 share of
image-to-image rows (40 % against 25 %). With the paper's share (about 5,600 super-resolution rows over stages 2 and
3) the generation expert had not learned to carry the input over: 21.4 dB on MedPix dev against 24.8 dB for bicubic."""
GENERATION_FINETUNE = {
    "steps": 2400,
    "learning_rate": 1e-3,
    "mixture": {"understanding": 0, "text_to_image": 1 / 3, "interleaved": 2 / 3},
}
"""The last step: generation rows only (`mixture`; "interleaved" = the super-resolution rows; the text-to-image rows are
the label prompts alone, `label_prompt_data`), understanding expert and ViT connector frozen (only the generation expert
trains), cosine LR from `learning_rate`. Super-resolution needs far more rows than the stages give it: after stage 3,
MedPix dev (197 images, bicubic 25.65 dB / 0.855 SSIM) reached 26.70 dB / 0.863 with 1,600 steps of super-resolution
rows only (v3) against 26.41 / 0.854 with LR 3e-4, but those steps cost text-to-image about 3 points of generated-image
modality (400 train prompts: 78.5 % after, 81.7 % before); with a third of text-to-image rows (the same 1,600
super-resolution steps) dev generated-image modality rose to 86.8 % (v3 80.7 %; SR 26.51 / 0.858). With the connector
training (as in v3) the step cost understanding answers (MedPix dev modality 84.3 → 79.7 %, open recall 20.7 → 19.5 %);
frozen, they stay stage 3's. Spread over one long mixed stage 3 instead (3,500 steps at 20 / 20 / 60 %) the
super-resolution rows reached 26.62 / 0.861, but text-to-image lost its prompt: generated-image region accuracy 53 %
against 70 % with a last fine-tune. v7 (4 VQA-RAD rounds, stages rebuilt): with the text-to-image rows from label
prompts and captions dev generated-image modality / region were 89.8 / 59.4 %, from the label prompts alone 91.9 / 65.0
% (guidance 3.0; SR 26.53 / 0.858 and 26.54 / 0.859); half text-to-image rows with captions reached 90.9 / 62.9 % but
SSIM 0.852, below bicubic."""

DEFAULTS = {
    "vocab_size": 3000,
    "vae_steps": 1100,
    "vae_batch_size": 16,
    "vae_learning_rate": 2e-3,
    "vae_kl_weight": 1e-5,
    "vision_steps": 6000,
    "vision_batch_size": 32,
    "vision_learning_rate": 1e-3,
    "stage_steps": (1200, 1000, 1600),
    "batch_size": 16,
    "learning_rate": 1e-3,
    "num_views": 3,
    "vqa_rounds": 4,
    "questions_per_turn": 3,
    "save_every": 200,
}


def norm_region(row: dict) -> str:
    return REGIONS.get(row.get("Location Category"), "other")


def norm_plane(row: dict) -> str:
    return PLANES.get((row.get("Description") or {}).get("Plane") or "", "other")


LABEL_NAMES = {"modality": MODALITY_NAMES, "region": REGION_NAMES, "plane": PLANE_NAMES}
"""Class names of each MedPix label kind (the vision heads, the choice questions and the evaluation's probe)."""


def row_labels(row: dict) -> dict[str, str]:
    """A MedPix row's label per kind of `LABEL_NAMES` (`"MR"`, `"head"`, `"sagittal"`; region and plane `"other"`
    where the row has none of the named ones)."""
    return {"modality": row["Type"], "region": norm_region(row), "plane": norm_plane(row)}


def label_indices(row: dict) -> tuple[int, ...]:
    """The class index of each of a MedPix row's labels in its `LABEL_NAMES` kind; -1 where it is not a class."""
    return tuple(names.index(value) if value in names else -1 for names, value in zip(LABEL_NAMES.values(), row_labels(row).values()))


def label_prompt(row: dict) -> str:
    """Short generation prompt from MedPix labels, e.g. `CT, axial, head`."""
    return f"{row['Type']}, {norm_plane(row)}, {norm_region(row)}"


def medpix_rows(data_dir: str, split: str) -> list[dict]:
    return read_jsonl(os.path.join(data_dir, "medpix", f"descriptions_{split}.jsonl"))


def medpix_questions(row: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs derived from one MedPix image's labels."""
    pairs = [(MODALITY_QUESTION, row["Type"])]
    if row.get("Location Category") in REGIONS:
        pairs.append((REGION_QUESTION, norm_region(row)))
    plane = norm_plane(row)
    if plane != "other":
        pairs.append((PLANE_QUESTION, plane))
    return pairs


LABEL_WORDS = {
    "modality": {"CT": "a CT", "MR": "an MRI"},
    "plane": {name: f"an {name}" if name[0] in "aeiou" else f"a {name}" for name in PLANE_NAMES},
    "region": {name: f"the {name}" for name in REGION_NAMES},
}
"""How the yes/no and either-or questions name each label value ("an MRI", "a sagittal", "the head")."""
LABEL_QUESTIONS = {
    "modality": ("Is this {} image?", "Is this {} or {} image?"),
    "plane": ("Is this {} image?", "Is this {} or {} image?"),
    "region": ("Does this image show {}?", "Does this image show {} or {}?"),
}
"""(yes/no, either-or) question templates per label kind, in the forms VQA-RAD asks them ("Is this an MRI?",
"Is this a CT or an MRI?")."""


def medpix_choice_questions(row: dict, rng: random.Random) -> list[tuple[str, str]]:
    """A yes/no and an either-or question on one MedPix image's labels (each on a label kind drawn at random): the
    yes/no one names the true value or another at random (half of each), the either-or one the true value and
    another in random order, answered with the option's own words ("MRI", "sagittal", "head")."""
    known = row_labels(row)
    kinds = [kind for kind, value in known.items() if value in LABEL_WORDS[kind]]
    yes_no_kind, choice_kind = rng.choice(kinds), rng.choice(kinds)
    words = LABEL_WORDS[yes_no_kind]
    asked = known[yes_no_kind] if rng.random() < 0.5 else rng.choice([v for v in words if v != known[yes_no_kind]])
    pairs = [(LABEL_QUESTIONS[yes_no_kind][0].format(words[asked]), "yes" if asked == known[yes_no_kind] else "no")]
    words = LABEL_WORDS[choice_kind]
    options = [known[choice_kind], rng.choice([v for v in words if v != known[choice_kind]])]
    rng.shuffle(options)
    question = LABEL_QUESTIONS[choice_kind][1].format(words[options[0]], words[options[1]])
    return pairs + [(question, words[known[choice_kind]].split(" ", 1)[1])]


def held_out_synpics(data_dir: str) -> set[str]:
    """MedPix image ids (`synpicN`) of the MedPix dev split: VQA-RAD images with these ids are never trained on."""
    return {row["image"].split("_", 1)[1] for row in medpix_rows(data_dir, "dev")}


def vqa_rad_train(data_dir: str) -> list[dict]:
    """VQA-RAD train questions, without those about images that are also MedPix dev images."""
    with open(os.path.join(data_dir, "vqa_rad", "trainset.json")) as handle:
        rows = json.load(handle)
    held_out = held_out_synpics(data_dir)
    return [row for row in rows if os.path.splitext(row["image_name"])[0] not in held_out]


# ----------------------------------------------------------------------------------------------------------------------
# Resumable training loops (VAE, vision encoder)
# ----------------------------------------------------------------------------------------------------------------------


class LoopCheckpoints:
    """Saves and restores the whole state of a hand-written training loop as `DIR/checkpoint-N` folders.

    A checkpoint holds the modules' weights, the optimizer state and the random generators (torch and Python) in
    `state.safetensors` and the step, the LR schedule and the log in `state.json`; it is written into a staging
    folder and renamed into place, so a killed run never leaves a partial checkpoint. Only safetensors and JSON are
    read back (nothing is unpickled). Resuming from step N then gives exactly the weights of an uninterrupted run.
    """

    def __init__(self, directory: str, modules: dict, optimizer, schedule, generator, rng: random.Random):
        self.directory, self.modules, self.optimizer = directory, modules, optimizer
        self.schedule, self.generator, self.rng = schedule, generator, rng

    def latest(self) -> str | None:
        if not os.path.isdir(self.directory):
            return None
        steps = [int(name.split("-")[1]) for name in os.listdir(self.directory) if name.startswith("checkpoint-")]
        return os.path.join(self.directory, f"checkpoint-{max(steps)}") if steps else None

    def save(self, step: int, history: list) -> None:
        from safetensors.torch import save_file

        tensors = {f"module.{name}.{key}": value.detach().contiguous() for name, module in self.modules.items() for key, value in module.state_dict().items()}
        optimizer = self.optimizer.state_dict()
        for index, state in optimizer["state"].items():
            tensors.update({f"optimizer.{index}.{key}": value.contiguous() for key, value in state.items()})
        tensors["generator"] = self.generator.get_state()
        target = os.path.join(self.directory, f"checkpoint-{step}")
        with staged_folder(target, overwrite=True) as staging:
            save_file(tensors, os.path.join(staging, "state.safetensors"))
            write_json(os.path.join(staging, "state.json"), {
                "step": step,
                "history": history,
                "param_groups": optimizer["param_groups"],
                "schedule": self.schedule.state_dict(),
                "rng": _jsonable(self.rng.getstate()),
            })
        for name in os.listdir(self.directory):
            if name.startswith("checkpoint-") and name != os.path.basename(target):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def load(self) -> tuple[int, list]:
        """Restores the latest checkpoint; returns `(step, history)` (`(0, [])` without one)."""
        from safetensors.torch import load_file

        folder = self.latest()
        if folder is None:
            return 0, []
        tensors = load_file(os.path.join(folder, "state.safetensors"))
        with open(os.path.join(folder, "state.json")) as handle:
            meta = json.load(handle)
        for name, module in self.modules.items():
            prefix = f"module.{name}."
            module.load_state_dict({key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)})
        state = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, field = key.split(".", 2)
                state.setdefault(int(index), {})[field] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.schedule.load_state_dict(meta["schedule"])
        self.generator.set_state(tensors["generator"])
        self.rng.setstate(_tuples(meta["rng"]))
        logger.info("Resumed %s at step %d.", self.directory, meta["step"])
        return meta["step"], meta["history"]


def _jsonable(value):
    return [_jsonable(item) for item in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


def run_loop(checkpoints: LoopCheckpoints, steps: int, step_fn, save_every: int, log_every: int = 25, name: str = "") -> list:
    """Runs `step_fn(step) -> dict of floats` for steps `[resumed step, steps)`, logging every `log_every` and saving
    a checkpoint every `save_every` steps and at the end; returns the log."""
    start, history = checkpoints.load()
    for step in range(start, steps):
        logs = step_fn(step)
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, **{key: round(float(value.detach() if hasattr(value, "detach") else value), 5) for key, value in logs.items()}})
            print(f"{name} step {step}: {history[-1]}", flush=True)
        if (step + 1) % save_every == 0 or step + 1 == steps:
            checkpoints.save(step + 1, history)
    return history


def cosine_with_warmup(steps: int, warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def training_text(data_dir: str) -> list[str]:
    """Every training-split text the model sees (and the prompt templates); no test/dev text."""
    vqa = vqa_rad_train(data_dir)
    texts = [row["question"] for row in vqa] + [str(row["answer"]) for row in vqa]
    for row in medpix_rows(data_dir, "train"):
        description = row.get("Description") or {}
        texts += [description.get("Caption") or "", description.get("Modality") or "", row.get("Location") or ""]
        texts += [label_prompt(row)] + [f"{q} {a}" for q, a in medpix_questions(row)]
    for row in read_jsonl(os.path.join(data_dir, "medpix", "data_train.jsonl")):
        texts += [str(value) for key, value in row.items() if isinstance(value, str) and key not in ("U_id",)]
    texts += [MODALITY_QUESTION, REGION_QUESTION, PLANE_QUESTION, SR_INSTRUCTION, REPORT_PROMPT]
    return [text for text in texts if text and text.strip()]


def train_tokenizer(data_dir: str, output_dir: str, vocab_size: int):
    """Trains the byte-level BPE and saves it as a Qwen2 tokenizer in `output_dir`; returns the loaded tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(output_dir, "tokenizer.json")):
        tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(training_text(data_dir), trainer=trainer)
        config = {
            "tokenizer_class": "Qwen2Tokenizer",
            "backend": "tokenizers",
            "bos_token": None,
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "extra_special_tokens": list(SPECIAL_TOKENS[1:]),
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "model_max_length": TEXT_CONFIG["max_position_embeddings"],
            "add_prefix_space": None,
        }
        with staged_folder(output_dir, overwrite=True) as staging:
            tokenizer.save(os.path.join(staging, "tokenizer.json"))
            write_json(os.path.join(staging, "tokenizer_config.json"), config, indent=2)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    for index, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != index:
            raise RuntimeError(f"{token} should have id {index} in the trained tokenizer.")
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------------


def square_pixels(images, size: int = IMAGE_SIZE):
    """`[n, 3, size, size]` float tensor in [-1, 1] of PIL images (any iterable; RGB, bicubic resize to a square)."""
    import numpy as np
    import torch

    from modeling_unimedvl.image_processing_unimedvl import to_rgb

    arrays = np.stack([np.asarray(to_rgb(image).resize((size, size), Image.BICUBIC), dtype=np.uint8) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_square_images(paths: list[str], size: int = IMAGE_SIZE):
    """`square_pixels` of the image files at `paths` (each file is open only while it is resized)."""

    def opened():
        for path in paths:
            with Image.open(path) as image:
                yield image

    return square_pixels(opened(), size)


def training_image_paths(data_dir: str) -> list[str]:
    """MedPix train images and the VQA-RAD train images (held-out ones excluded)."""
    paths = [os.path.join(data_dir, "medpix", "images", f"{row['image']}.png") for row in medpix_rows(data_dir, "train")]
    names = sorted({row["image_name"] for row in vqa_rad_train(data_dir)})
    return paths + [os.path.join(data_dir, "vqa_rad", "images", name) for name in names]


def augmented_view(image: Image.Image, rng: random.Random) -> Image.Image:
    """A random view of a grey medical image whose labels (modality, region, plane) it keeps: a crop of 70–100 % of
    the area (aspect ×0.85–1.18), a horizontal flip half of the time, a rotation of up to ±10°, contrast ×0.6–1.4,
    brightness ×0.8–1.2 and, a third of the time, a gamma of 0.7–1.4 (other windows of the same scan)."""
    width, height = image.size
    scale, aspect = rng.uniform(0.7, 1.0), rng.uniform(0.85, 1.18)
    crop_w, crop_h = min(width, round(width * (scale * aspect) ** 0.5)), min(height, round(height * (scale / aspect) ** 0.5))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    view = image.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    view = view.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR)
    view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.6, 1.4))
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 1 / 3:
        gamma = rng.uniform(0.7, 1.4)
        view = view.point([round(255 * (value / 255) ** gamma) for value in range(256)] * (len(view.getbands())))
    return view


def psnr(a, b) -> float:
    """Mean PSNR (dB) of images in [-1, 1]."""
    mse = (((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * (1.0 / mse).log10()).mean())


# ----------------------------------------------------------------------------------------------------------------------
# VAE (stage 0a)
# ----------------------------------------------------------------------------------------------------------------------


def vae_config(scaling_factor: float = 1.0, shift_factor: float = 0.0) -> dict:
    from modeling_unimedvl.configuration_unimedvl import FLUX_VAE_CONFIG

    levels = len(VAE_GEOMETRY["block_out_channels"])
    config = dict(FLUX_VAE_CONFIG)
    config.update(
        block_out_channels=list(VAE_GEOMETRY["block_out_channels"]),
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        latent_channels=VAE_GEOMETRY["latent_channels"],
        layers_per_block=VAE_GEOMETRY["layers_per_block"],
        norm_num_groups=VAE_GEOMETRY["norm_num_groups"],
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
    return config


def train_vae(data_dir: str, output_dir: str, seed: int, steps: int, batch_size: int, learning_rate: float, kl_weight: float, save_every: int) -> dict:
    """Trains the small FLUX-layout VAE for `steps` steps of the cosine schedule over `SCHEDULE_STEPS["vae"]`
    (resumable); saves it (diffusers folder `OUTPUT/vae`) with its latent
    statistics and returns the report (`OUTPUT/vae_report.json`)."""
    import torch
    from diffusers import AutoencoderKL

    report_path = os.path.join(output_dir, "vae_report.json")
    if os.path.isfile(report_path):
        with open(report_path) as handle:
            return json.load(handle)
    torch.manual_seed(seed)
    start = time.perf_counter()
    train = load_square_images(training_image_paths(data_dir))
    vae = AutoencoderKL(**vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(max(steps, SCHEDULE_STEPS["vae"]), 50))
    generator = torch.Generator().manual_seed(seed)
    checkpoints = LoopCheckpoints(os.path.join(output_dir, "checkpoints"), {"vae": vae}, optimizer, schedule, generator, random.Random(seed))
    vae.train()

    def step_fn(step):
        index = torch.randint(0, train.shape[0], (batch_size,), generator=generator)
        batch = train[index]
        flip = torch.rand(batch_size, generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        top, left = (int(v) for v in torch.randint(0, IMAGE_SIZE - VAE_CROP + 1, (2,), generator=generator))
        batch = batch[:, :, top : top + VAE_CROP, left : left + VAE_CROP]
        posterior = vae.encode(batch).latent_dist
        latent = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latent).sample
        l1 = (reconstruction - batch).abs().mean()
        mse = ((reconstruction - batch) ** 2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        optimizer.zero_grad(set_to_none=True)
        (l1 + mse + kl_weight * kl).backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        return {"l1": l1, "mse": mse, "kl": kl}

    history = run_loop(checkpoints, steps, step_fn, save_every, name="VAE")
    vae.eval()
    sample = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[:VAE_STATISTICS_IMAGES]]
    with torch.no_grad():
        means = torch.cat([vae.encode(sample[i : i + 128]).latent_dist.mean for i in range(0, sample.shape[0], 128)])
        reconstruction = torch.cat([vae.decode(means[i : i + 128]).sample for i in range(0, means.shape[0], 128)])
        low = torch.nn.functional.interpolate(sample, scale_factor=0.5, mode="bicubic", antialias=True)
        bicubic = torch.nn.functional.interpolate(low, scale_factor=2, mode="bicubic").clamp(-1, 1)
    shift, scale = float(means.mean()), float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    with staged_folder(os.path.join(output_dir, "vae"), overwrite=True) as staging:
        vae.save_pretrained(staging)
    report = {
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "kl_weight": kl_weight,
        "train_images": int(train.shape[0]),
        "resolution": IMAGE_SIZE,
        "train_crop": VAE_CROP,
        **{key: list(value) if isinstance(value, tuple) else value for key, value in VAE_GEOMETRY.items()},
        "downsampling": 2 ** (len(VAE_GEOMETRY["block_out_channels"]) - 1),
        "parameters": sum(p.numel() for p in vae.parameters()),
        "scaling_factor": scale,
        "shift_factor": shift,
        "statistics_images": int(sample.shape[0]),
        "train_psnr": round(psnr(reconstruction, sample), 2),
        "train_psnr_2x_bicubic": round(psnr(bicubic, sample), 2),
        "first": history[0],
        "last": history[-1],
        "history": history,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    write_json(report_path, report, indent=1)
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def build_initial_model(tokenizer, output_dir: str, seed: int) -> str:
    """A random UniMedVL of the Tiny size (its VAE too: `assemble_start_model` puts the trained one in), saved in the
    converted layout with its processor and generation config."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, SiglipVisionConfig

    from modeling_unimedvl import UniMedVLConfig, UniMedVLForConditionalGeneration, UniMedVLImageProcessor, UniMedVLProcessor

    if os.path.isfile(os.path.join(output_dir, "config.json")):
        return output_dir
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        dtype=torch.float32,
        **{k: v for k, v in TEXT_CONFIG.items() if k != "rope_theta"},
        rope_parameters={"rope_type": "default", "rope_theta": TEXT_CONFIG["rope_theta"]},
    )
    config = UniMedVLConfig(
        text_config=text_config,
        vision_config=SiglipVisionConfig(**VISION_CONFIG, dtype=torch.float32),
        vae_config=vae_config(),
        latent_patch_size=LATENT_PATCH_SIZE,
        max_latent_size=IMAGE_SIZE // (2 ** (len(VAE_GEOMETRY["block_out_channels"]) - 1) * LATENT_PATCH_SIZE),
        vit_max_num_patch_per_side=UNDERSTANDING_SIDE // VIT_PATCH,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"],
        latent_token_id=ids["<|latent_pad|>"],
        dtype=torch.float32,
    )
    config.architectures = ["UniMedVLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = UniMedVLForConditionalGeneration(config)
    image_processor = UniMedVLImageProcessor(
        understanding_transform=tuple(IMAGE_TRANSFORMS["understanding"]),
        generation_vit_transform=tuple(IMAGE_TRANSFORMS["generation_vit"]),
        generation_vae_transform=tuple(IMAGE_TRANSFORMS["generation_vae"]),
        patch_size=VIT_PATCH,
    )
    with staged_folder(output_dir, overwrite=True) as staging:
        model.save_pretrained(staging)
        GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
            do_sample=False, max_new_tokens=32,
        ).save_pretrained(staging)
        UniMedVLProcessor(image_processor, tokenizer, latent_downsample=config.latent_downsample).save_pretrained(staging)
    return output_dir


def assemble_start_model(vision_model_dir: str, vae_dir: str, output_dir: str) -> str:
    """The curriculum's starting model: the model with the pretrained vision encoder and, inside it, the trained VAE
    with its `scaling_factor` / `shift_factor` (the VAE and vision steps are independent of each other)."""
    import torch
    from diffusers import AutoencoderKL

    from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor

    if os.path.isfile(os.path.join(output_dir, "config.json")):
        return output_dir
    model = UniMedVLForConditionalGeneration.from_pretrained(vision_model_dir, dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    model.model.vae.load_state_dict(vae.state_dict(), strict=True)
    model.config.vae_config = vae_config(vae.config.scaling_factor, vae.config.shift_factor)
    model.model.vae.register_to_config(scaling_factor=vae.config.scaling_factor, shift_factor=vae.config.shift_factor)
    with staged_folder(output_dir, overwrite=True) as staging:
        model.save_pretrained(staging)
        UniMedVLProcessor.from_pretrained(vision_model_dir).save_pretrained(staging)
    return output_dir


# ----------------------------------------------------------------------------------------------------------------------
# Vision encoder (stage 0b)
# ----------------------------------------------------------------------------------------------------------------------


def vision_labels(data_dir: str) -> list[tuple[str, tuple[int, int, int]]]:
    """`(image path, (modality, region, plane))` of every training image; -1 where the data has no such label."""
    items = []
    for row in medpix_rows(data_dir, "train"):
        items.append((os.path.join(data_dir, "medpix", "images", f"{row['image']}.png"), label_indices(row)))
    organs = {}
    for row in vqa_rad_train(data_dir):
        if row.get("image_organ") in VQA_RAD_ORGANS:
            organs[row["image_name"]] = REGION_NAMES.index(VQA_RAD_ORGANS[row["image_organ"]])
    items += [(os.path.join(data_dir, "vqa_rad", "images", name), (-1, region, -1)) for name, region in sorted(organs.items())]
    return items


def pretrain_vision(data_dir: str, model_dir: str, output_dir: str, seed: int, steps: int, batch_size: int, learning_rate: float, save_every: int) -> dict:
    """Pretrains the model's SigLIP NaViT, connector and ViT position table on the training labels for `steps` steps
    of the cosine schedule over `SCHEDULE_STEPS["vision"]` (resumable);
    writes the whole model with those weights to `OUTPUT/model` and returns the report (`OUTPUT/vision_report.json`)."""
    import torch
    from torch import nn

    from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor

    report_path = os.path.join(output_dir, "vision_report.json")
    if os.path.isfile(report_path):
        with open(report_path) as handle:
            return json.load(handle)
    start = time.perf_counter()
    model = UniMedVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    processor = UniMedVLProcessor.from_pretrained(model_dir)
    image_processor = processor.image_processor
    items = vision_labels(data_dir)
    images = [_reduced_grey(path, 2 * UNDERSTANDING_SIDE) for path, _ in items]
    labels = torch.tensor([label for _, label in items])
    torch.manual_seed(seed)
    encoder = model.model
    trained = nn.ModuleDict({"vision_tower": encoder.vision_tower, "connector": encoder.connector, "vit_pos_embed": encoder.vit_pos_embed})
    hidden = model.config.text_config.hidden_size
    heads = nn.ModuleList([nn.Linear(hidden, len(MODALITY_NAMES)), nn.Linear(hidden, len(REGION_NAMES)), nn.Linear(hidden, len(PLANE_NAMES))])
    parameters = list(trained.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.05, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(max(steps, SCHEDULE_STEPS["vision"]), 100))
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    checkpoints = LoopCheckpoints(os.path.join(output_dir, "checkpoints"), {"encoder": trained, "heads": heads}, optimizer, schedule, generator, rng)
    transform = image_processor.understanding_transform
    trained.train()

    def step_fn(step):
        index = torch.randint(0, len(images), (batch_size,), generator=generator).tolist()
        patches, grids = [], []
        for i in index:
            view = image_processor.resize(augmented_view(images[i], rng).convert("RGB"), transform)
            view_patches, grid = image_processor.patchify(image_processor.to_tensor(view))
            patches.append(view_patches)
            grids.append(grid)
        grid_hw = torch.tensor(grids)
        features = encoder.get_image_features(torch.cat(patches), grid_hw)
        pooled = torch.stack([f.mean(0) for f in features.split((grid_hw[:, 0] * grid_hw[:, 1]).tolist())])
        target = labels[index]
        losses = [nn.functional.cross_entropy(head(pooled), target[:, k], ignore_index=-1) for k, head in enumerate(heads) if (target[:, k] >= 0).any()]
        loss = sum(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        return {"loss": loss}

    history = run_loop(checkpoints, steps, step_fn, save_every, name="vision")
    with staged_folder(os.path.join(output_dir, "model"), overwrite=True) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    report = {
        "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "images": len(images),
        "first": history[0], "last": history[-1], "history": history, "wall_s": round(time.perf_counter() - start, 1),
    }
    write_json(report_path, report, indent=1)
    return report


def _reduced_grey(path: str, side: int) -> Image.Image:
    """The grey image at `path`, shrunk so that its long side is at most `side`: views are cropped from it and then
    resized to the understanding size, so a full-resolution copy would only cost time."""
    with Image.open(path) as image:
        return _fit_within(image.convert("L"), side)


def _fit_within(image: Image.Image, side: int) -> Image.Image:
    """`image` shrunk (bicubic, aspect kept) so that its long side is at most `side`; a smaller image as it is."""
    scale = min(1.0, side / max(image.size))
    if scale == 1.0:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)


def pretrain_in_parallel(jobs: dict, threads: int) -> dict:
    """Runs independent stage-0 steps (`{name: (function, args)}`, module-level functions) in parallel processes,
    each with `threads` torch threads (fixed, so that each result is reproducible bit for bit); returns
    `{name: (result, wall seconds)}`. A failure in one step is raised here with its name."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(len(jobs), mp_context=get_context("spawn")) as pool:
        futures = {name: pool.submit(_timed_with_threads, threads, function, args) for name, (function, args) in jobs.items()}
        results = {}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except Exception as error:
                raise RuntimeError(f"Stage-0 step {name!r} failed: {error}") from error
    return results


def _timed_with_threads(threads: int, function, args: tuple):
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    return function(*args), round(time.perf_counter() - start, 1)


# ----------------------------------------------------------------------------------------------------------------------
# Curriculum data
# ----------------------------------------------------------------------------------------------------------------------


def saved_views(source: str, out_dir: str, name: str, count: int, seed: int) -> list[str]:
    """`count` views of one training image (≤ the understanding size) written once to `out_dir`: the whole image,
    then `augmented_view`s."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{name}_v{index}.png") for index in range(count)]
    if all(os.path.isfile(path) for path in paths):
        return paths
    rng = random.Random(f"{seed}:{name}")
    with Image.open(source) as image:
        image = image.convert("L")
        for index, path in enumerate(paths):
            _fit_within(image if index == 0 else augmented_view(image, rng), UNDERSTANDING_SIDE).save(path)
    return paths


def conversation(image: str, pairs: list[tuple[str, str]]) -> dict:
    """An understanding row: the image, then `(question, answer)` turns."""
    messages = []
    for turn, (question, answer) in enumerate(pairs):
        messages += [{"from": "human", "value": f"<image>\n{question}" if turn == 0 else question}, {"from": "gpt", "value": answer}]
    return {"main_task_type": "understanding", "sub_task_type": "vqa", "input_img": [{"path": image}], "output_img": [], "message": messages}


def build_data(data_dir: str, out_dir: str, seed: int, num_views: int = DEFAULTS["num_views"], vqa_rounds: int = DEFAULTS["vqa_rounds"], questions_per_turn: int = DEFAULTS["questions_per_turn"], num_sr: int | None = None) -> dict:
    """Writes the JSONL files of the three data groups (training splits only); returns the `data:` config.

    Understanding: VQA-RAD train questions grouped by image into conversations of `questions_per_turn` questions
    (`vqa_rounds` different random groupings), a region question per VQA-RAD train image (its organ label), one
    conversation with the MedPix modality / region / plane questions and a yes/no and an either-or question on the
    same labels (`medpix_choice_questions`; random order) per view of each MedPix train image (`num_views` views,
    `saved_views`), and the MedPix caption as the answer to the report prompt.
    Text-to-image: each MedPix train image from its label prompt and from its caption. Image-to-image: 2×
    super-resolution pairs of the MedPix train images (`num_sr`, default all)."""
    data_dir, out_dir = os.path.abspath(data_dir), os.path.abspath(out_dir)  # image paths in the JSONL are absolute
    rng = random.Random(seed)
    medpix = medpix_rows(data_dir, "train")
    medpix_images = os.path.join(data_dir, "medpix", "images")
    understanding = []
    by_image: dict[str, list[tuple[str, str]]] = {}
    organ_of = {}
    for row in vqa_rad_train(data_dir):
        by_image.setdefault(row["image_name"], []).append((row["question"], str(row["answer"]).strip()))
        if row.get("image_organ") in VQA_RAD_ORGANS:
            organ_of[row["image_name"]] = VQA_RAD_ORGANS[row["image_organ"]]
    for name in sorted(by_image):
        view = saved_views(os.path.join(data_dir, "vqa_rad", "images", name), os.path.join(out_dir, "vqa_rad_views"), os.path.splitext(name)[0], 1, seed)[0]
        for _ in range(vqa_rounds):
            pairs = list(by_image[name])
            rng.shuffle(pairs)
            understanding += [conversation(view, pairs[i : i + questions_per_turn]) for i in range(0, len(pairs), questions_per_turn)]
        if name in organ_of:
            understanding.append(conversation(view, [(REGION_QUESTION, organ_of[name])]))
    for row in medpix:
        views = saved_views(os.path.join(medpix_images, f"{row['image']}.png"), os.path.join(out_dir, "medpix_views"), row["image"], num_views, seed)
        for view in views:
            pairs = medpix_questions(row) + medpix_choice_questions(row, rng)
            rng.shuffle(pairs)
            understanding.append(conversation(view, pairs))
        caption = ((row.get("Description") or {}).get("Caption") or "").strip()
        if caption:
            understanding.append(conversation(views[0], [(REPORT_PROMPT, caption)]))
    t2i = []
    for row in medpix:
        t2i.append(_t2i_row(f"{row['image']}.png", label_prompt(row)))
        caption = ((row.get("Description") or {}).get("Caption") or "").strip()
        if caption:
            t2i.append(_t2i_row(f"{row['image']}.png", caption))
    chosen = medpix if num_sr is None else random.Random(seed).sample(medpix, min(num_sr, len(medpix)))
    os.makedirs(os.path.join(out_dir, "sr"), exist_ok=True)
    sr = []
    for row in chosen:
        low, high = sr_pair(os.path.join(medpix_images, f"{row['image']}.png"), os.path.join(out_dir, "sr"), row["image"], SR_TRANSFORM)
        sr.append({
            "main_task_type": "image_editing",
            "sub_task_type": "super_resolution",
            "input_img": [{"path": low}],
            "output_img": [{"path": high}],
            # no reply text before the target: the sequence is then exactly the image-to-image inference context
            "message": [{"from": "human", "value": f"<image>\n{SR_INSTRUCTION}"}],
        })
    return {
        "understanding": [{"jsonl": write_jsonl(os.path.join(out_dir, "understanding.jsonl"), understanding), "image_dir": out_dir}],
        "text_to_image": [{"jsonl": write_jsonl(os.path.join(out_dir, "t2i.jsonl"), t2i), "image_dir": medpix_images}],
        "interleaved": [{"jsonl": write_jsonl(os.path.join(out_dir, "sr.jsonl"), sr), "task": "image_to_image"}],
    }


def _t2i_row(image_name: str, prompt: str) -> dict:
    return {
        "main_task_type": "generation",
        "sub_task_type": "t2i",
        "input_img": [],
        "output_img": [{"path": image_name}],
        "message": [{"from": "human", "value": prompt}],
    }


def curriculum_config(data: dict, stage_steps, batch_size: int, learning_rate: float, seed: int) -> dict:
    """The user config of the three stages: the data, the Tiny resolutions, and per-stage overrides of the shipped
    stage configs (steps, LR, batch, the stage-3 mixture `STAGE_MIXTURES`; the pretrained ViT stays frozen as in the
    original, the VAE too)."""
    return {
        "data": data,
        "image_transforms": IMAGE_TRANSFORMS,
        "max_tokens_per_sample": 512,
        "freeze": {"vit": True, "vae": True, "und": False, "gen": False},
        "training": {
            "learning_rate": learning_rate,
            "warmup_steps": 50,
            "per_device_train_batch_size": batch_size,
            "save_steps": 100,
            "save_total_limit": 1,
            "logging_steps": 10,
            "ema_decay": 0.99,
            "disable_tqdm": True,
            "seed": seed,
            "data_seed": seed,
            "dataloader_num_workers": 0,
        },
        "stages": {
            1: {"training": {"max_steps": stage_steps[0]}},
            2: {"training": {"max_steps": stage_steps[1]}},
            3: {"training": {"max_steps": stage_steps[2], "lr_scheduler_type": "cosine"}, "mixture": STAGE_MIXTURES[3]},
        },
    }


def label_prompt_data(data_dir: str, out_dir: str) -> list[dict]:
    """Writes the generation fine-tune's text-to-image rows — each MedPix train image from its label prompt only
    (`label_prompt`; the stages also train on its caption) — to `OUT_DIR/t2i_label_prompts.jsonl`; returns the
    `text_to_image` data sources."""
    rows = [_t2i_row(f"{row['image']}.png", label_prompt(row)) for row in medpix_rows(data_dir, "train")]
    jsonl = write_jsonl(os.path.join(os.path.abspath(out_dir), "t2i_label_prompts.jsonl"), rows)
    return [{"jsonl": jsonl, "image_dir": os.path.join(os.path.abspath(data_dir), "medpix", "images")}]


def generation_finetune_config(user_config: dict, steps: int, learning_rate: float, text_to_image: list[dict]) -> dict:
    """The stage config of the generation fine-tune (`GENERATION_FINETUNE`): stage 3's, on its mixture of
    super-resolution rows and the `text_to_image` sources (`label_prompt_data`), for `steps` steps of a cosine
    schedule from `learning_rate`, with the understanding expert and the ViT connector frozen as well: only the
    generation expert trains."""
    from .curriculum import load_stage_config

    stage3 = user_config["stages"][3]
    override = {
        "data": dict(user_config["data"], text_to_image=text_to_image),
        "training": dict(stage3["training"], max_steps=steps, learning_rate=learning_rate),
        "mixture": GENERATION_FINETUNE["mixture"],
        "freeze": dict(user_config["freeze"], und=True, connector=True),
    }
    return load_stage_config(3, dict(user_config, stages={3: override}))


# ----------------------------------------------------------------------------------------------------------------------
# Final folder and the shipped copy
# ----------------------------------------------------------------------------------------------------------------------


def write_final(stage_final: str, output_dir: str, vae_dir: str, use_ema: bool = False) -> str:
    """Saves the last stage's model (EMA weights if `use_ema`) with `save_pretrained` into `output_dir`: config with
    `auto_map`, float32 `model.safetensors`, processor, tokenizer, generation config and the model code files.

    The VAE is frozen in every curriculum stage, so its weights are the stage-0 VAE's; they are set from `vae_dir`
    so that the final folder always holds exactly that VAE.
    """
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor

    model = UniMedVLForConditionalGeneration.from_pretrained(stage_final, dtype=torch.float32)
    if use_ema:
        ema = load_file(os.path.join(stage_final, "ema.safetensors"))
        state = model.state_dict()
        model.load_state_dict({key: ema.get(key, value) for key, value in state.items()})
    model.model.vae.load_state_dict(AutoencoderKL.from_pretrained(vae_dir).state_dict(), strict=True)
    processor = UniMedVLProcessor.from_pretrained(stage_final)
    _restore_special_token_ids(model, processor.tokenizer)
    with staged_folder(output_dir, overwrite=True) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return output_dir


def _restore_special_token_ids(model, tokenizer) -> None:
    """Sets the model's and its generation config's start / end / pad ids back to `<|im_start|>` / `<|im_end|>` /
    `<|endoftext|>`: the trainer aligns them with the tokenizer's `eos_token` (`<|endoftext|>`), which would make
    decoding run past `<|im_end|>`."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (("bos", "<|im_start|>"), ("eos", "<|im_end|>"), ("pad", "<|endoftext|>"))}
    for config in (model.config, model.config.text_config, model.generation_config):
        config.bos_token_id, config.eos_token_id, config.pad_token_id = ids["bos"], ids["eos"], ids["pad"]


CODE_SUFFIX = ".py"


def code_files(folder: str) -> list[str]:
    """Names of the model code files in a saved folder."""
    return sorted(name for name in os.listdir(folder) if name.endswith(CODE_SUFFIX))


def current_code() -> dict[str, bytes]:
    """`{file name: content}` of the code files `save_pretrained` copies into a UniMedVL folder: the modules of the
    config, model, processor and image processor classes with everything they import relatively (transformers'
    `get_relative_import_files`, the rule `save_pretrained` itself follows), read from the installed package."""
    from transformers.dynamic_module_utils import get_relative_import_files

    import modeling_unimedvl

    files = set()
    for cls in (modeling_unimedvl.UniMedVLConfig, modeling_unimedvl.UniMedVLForConditionalGeneration,
                modeling_unimedvl.UniMedVLProcessor, modeling_unimedvl.UniMedVLImageProcessor):
        module_file = sys.modules[cls.__module__].__file__
        files |= {module_file, *get_relative_import_files(module_file)}
    return {os.path.basename(path): open(path, "rb").read() for path in sorted(files)}


def refresh_code_files(folder: str) -> list[str]:
    """Makes the code files of a saved UniMedVL folder (e.g. the shipped UniMedVL-Tiny) equal to the installed
    package's current sources: writes every file `current_code` gives and removes code files it no longer needs.
    Weights, config and tokenizer are left as they are. Returns the names of the files that changed."""
    from modeling_unimedvl.atomic_files import write_text

    wanted = current_code()
    changed = []
    for name in code_files(folder):
        if name not in wanted:
            os.remove(os.path.join(folder, name))
            changed.append(name)
    for name, content in wanted.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or open(path, "rb").read() != content:
            write_text(path, content.decode("utf-8"))
            changed.append(name)
    return sorted(changed)


def ship_default_model(final_dir: str, target_dir: str) -> str:
    """Installs the final folder (weights, config with `auto_map`, tokenizer, processor, code files) as the package's
    default model (`modeling_unimedvl/unimedvl_tiny/`), replacing the previous one atomically; the code files are
    then refreshed from the package's current sources."""
    with staged_folder(target_dir, overwrite=True) as staging:
        for name in sorted(os.listdir(final_dir)):
            if os.path.isfile(os.path.join(final_dir, name)) and not name.startswith("."):
                shutil.copyfile(os.path.join(final_dir, name), os.path.join(staging, name))
                os.chmod(os.path.join(staging, name), 0o644)  # package data: readable by everyone
    refresh_code_files(target_dir)
    return target_dir


def _size_report(folder: str) -> dict:
    """Parameter count, dtype and megabytes of the weights in `folder`."""
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as handle:
        tensors = [handle.get_slice(key) for key in handle.keys()]
        parameters = sum(math.prod(t.get_shape()) for t in tensors)
        dtypes = sorted({t.get_dtype() for t in tensors})
    total = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
    return {
        "parameters": parameters,
        "dtypes": dtypes,
        "megabytes": round(os.path.getsize(os.path.join(folder, "model.safetensors")) / 2**20, 2),
        "folder_megabytes": round(total / 2**20, 2),
    }


def _stage_only(user_config: dict, stage: int) -> dict:
    """The user config with the per-stage override of `stage` only (stage configs merge it under `stages`)."""
    return dict(user_config, stages={stage: user_config["stages"][stage]})


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


class StepTimings:
    """Wall seconds of each build step, kept in a JSON file (`{"stage1_s": 632.1, ...}`) across resumed runs: each
    run's time is added to that of the step's earlier runs, so a resumed build reports all the time it took (a
    finished step costs a resumed run next to nothing; the data step, redone every run, finds its images on disk)."""

    def __init__(self, path: str):
        self.path = path
        self.seconds = json.load(open(path)) if os.path.isfile(path) else {}

    def run(self, name: str, function, *args, **kwargs):
        """`function(*args, **kwargs)`, its wall time recorded under `name`."""
        start = time.perf_counter()
        result = function(*args, **kwargs)
        self.record(name, time.perf_counter() - start)
        return result

    def record(self, name: str, seconds: float) -> None:
        """Adds `seconds` to the time recorded under `name` and writes the file."""
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 1)
        write_json(self.path, self.seconds, indent=1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("UNIMEDVL_DATA_DIR", "../shared/data"))
    parser.add_argument("--output", default="outputs/unimedvl_tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=DEFAULTS["vocab_size"])
    parser.add_argument("--vae-steps", type=int, default=DEFAULTS["vae_steps"])
    parser.add_argument("--vision-steps", type=int, default=DEFAULTS["vision_steps"])
    parser.add_argument("--stage-steps", type=int, nargs=3, default=list(DEFAULTS["stage_steps"]), metavar=("S1", "S2", "S3"))
    parser.add_argument("--generation-finetune-steps", type=int, default=GENERATION_FINETUNE["steps"], help="steps of the last step, the generation fine-tune")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--learning-rate", type=float, default=DEFAULTS["learning_rate"])
    parser.add_argument("--num-views", type=int, default=DEFAULTS["num_views"], help="views per MedPix image for the understanding questions")
    parser.add_argument("--num-sr", type=int, default=None, help="super-resolution pairs (default: every MedPix train image)")
    parser.add_argument("--save-every", type=int, default=DEFAULTS["save_every"], help="checkpoint interval of the VAE and vision steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (fix it for bit-for-bit reproducibility)")
    parser.add_argument("--ema", action="store_true", help="ship the EMA weights of stage 3 instead of the last weights")
    parser.add_argument("--machine", default="2-core CPU dev box (shared)", help="machine description for the summary")
    parser.add_argument("--stop-after", choices=("tokenizer", "model", "vision", "vae", "data"), default=None)
    parser.add_argument("--ship", action="store_true", help="install the result as the package's default model")
    parser.add_argument("--refresh-code", metavar="FOLDER", nargs="?", const="", default=None,
                        help="only refresh the code files of FOLDER (default: the shipped UniMedVL-Tiny) from the package")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.refresh_code is not None:
        from modeling_unimedvl.default_model import DEFAULT_MODEL_DIR

        folder = args.refresh_code or DEFAULT_MODEL_DIR
        changed = refresh_code_files(folder)
        print(f"{folder}: {', '.join(changed) if changed else 'code files already current'}")
        return {"refreshed": changed}

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    step_timings = StepTimings(os.path.join(output, "timings.json"))
    timed = step_timings.run

    tokenizer = timed("tokenizer_s", train_tokenizer, args.data, os.path.join(output, "tokenizer"), args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens", flush=True)
    if args.stop_after == "tokenizer":
        return {}
    model_dir = build_initial_model(tokenizer, os.path.join(output, "model_init"), args.seed)
    if args.stop_after == "model":
        return {}
    stage0 = {
        "vision": (pretrain_vision, (args.data, model_dir, os.path.join(output, "vision_stage"), args.seed, args.vision_steps,
                                     DEFAULTS["vision_batch_size"], DEFAULTS["vision_learning_rate"], args.save_every)),
        "vae": (train_vae, (args.data, os.path.join(output, "vae_stage"), args.seed, args.vae_steps,
                            DEFAULTS["vae_batch_size"], DEFAULTS["vae_learning_rate"], DEFAULTS["vae_kl_weight"], args.save_every)),
    }
    in_parallel = args.stop_after not in ("vision", "vae") and torch.get_num_threads() >= 2
    reports = {}
    if not in_parallel:
        for name, (function, f_args) in stage0.items():
            reports[name] = timed(f"{name}_s", function, *f_args)
            if args.stop_after == name:
                return {}
    else:  # independent of each other: one process each, half the threads each
        for name, (report, seconds) in pretrain_in_parallel(stage0, torch.get_num_threads() // 2).items():
            step_timings.record(f"{name}_s", seconds)
            reports[name] = report
    vision_report, vae_report = reports["vision"], reports["vae"]
    print(f"VAE: train PSNR {vae_report['train_psnr']} dB (2x bicubic: {vae_report['train_psnr_2x_bicubic']} dB)", flush=True)
    if args.stop_after == "vae":
        return {}
    start_dir = assemble_start_model(os.path.join(output, "vision_stage", "model"), os.path.join(output, "vae_stage", "vae"), os.path.join(output, "model_start"))
    data = timed("data_s", build_data, args.data, os.path.join(output, "data"), args.seed, args.num_views, num_sr=args.num_sr)
    if args.stop_after == "data":
        return {}
    from .curriculum import load_stage_config, run_curriculum, run_stage

    user_config = curriculum_config(data, args.stage_steps, args.batch_size, args.learning_rate, args.seed)
    finals = []
    for stage in (1, 2, 3):
        previous = start_dir if stage == 1 else finals[-1]
        finals += timed(f"stage{stage}_s", run_curriculum, [stage], _stage_only(user_config, stage), previous, output, use_cpu=True)
    label_prompts = label_prompt_data(args.data, os.path.join(output, "data"))
    finetune = generation_finetune_config(user_config, args.generation_finetune_steps, GENERATION_FINETUNE["learning_rate"], label_prompts)
    finals.append(timed("generation_finetune_s", run_stage, finetune, finals[-1], os.path.join(output, "generation_finetune"), use_cpu=True))
    final = os.path.join(output, "final")
    if not os.path.isfile(os.path.join(final, "model.safetensors")):
        write_final(finals[-1], final, os.path.join(output, "vae_stage", "vae"), args.ema)
    summary = {
        "command": "python -m unimedvl_training.build_unimedvl_tiny " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "timings_s": step_timings.seconds,
        "vae": {k: v for k, v in vae_report.items() if k != "history"},
        "vision": {k: v for k, v in vision_report.items() if k != "history"},
        "stages": [summarize(name, f) for name, f in zip(("stage1", "stage2", "stage3", "generation fine-tune"), finals)],
        "final": final,
        "use_ema": args.ema,
        "torch_threads": torch.get_num_threads(),
        "machine": args.machine,
        "vocab_size": len(tokenizer),
        "stage_steps": list(args.stage_steps),
        "stage_mixtures": [load_stage_config(stage, user_config)["mixture"] for stage in (1, 2, 3)],
        "generation_finetune": {"steps": args.generation_finetune_steps, "learning_rate": finetune["training"]["learning_rate"],
                                "mixture": finetune["mixture"], "freeze": finetune["freeze"], "text_to_image": label_prompts},
        "num_views": args.num_views,
        "vqa_rounds": DEFAULTS["vqa_rounds"],
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "text_config": TEXT_CONFIG,
        "vision_config": VISION_CONFIG,
        "image_size": IMAGE_SIZE,
        "latent_patch_size": LATENT_PATCH_SIZE,
        "understanding_side": UNDERSTANDING_SIDE,
        "freeze": user_config["freeze"],
        "stage0_in_parallel": in_parallel,
        **_size_report(final),
    }
    if args.ship:
        from modeling_unimedvl.default_model import DEFAULT_MODEL_DIR

        summary["shipped"] = ship_default_model(final, DEFAULT_MODEL_DIR)
    write_json(os.path.join(output, "build_summary.json"), summary, indent=1)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
