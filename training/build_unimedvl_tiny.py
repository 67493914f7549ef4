"""Builds UniMedVL-Tiny from scratch on the CPU: tokenizer, VAE, random small UniMedVL, the three curriculum stages.

    python -m unimedvl_training.build_unimedvl_tiny --data ../shared/data --output outputs/unimedvl_tiny --seed 0

Steps (each is skipped when its output exists, so an interrupted run resumes):

0. **Tokenizer** — a byte-level BPE (`tokenizers`, Qwen2 pre-tokenizer) trained on the *training* text only: VQA-RAD
   train questions/answers, MedPix train captions/labels/case text and the prompt templates below; the UniMedVL special
   tokens get ids 0–6. Saved as a `Qwen2Tokenizer` (tokenizer.json + tokenizer_config.json).
1. **VAE** (stage 0) — the original uses the pretrained FLUX VAE; there is none at this size, so a diffusers
   `AutoencoderKL` with the FLUX layout (4 levels = 8× downsampling, 16 latent channels, same block types, one res
   block, small widths) is trained on MedPix train + VQA-RAD images at 64 px (L1 + MSE + small KL). Its latent mean /
   std set `shift_factor` / `scaling_factor` as FLUX does (`(z − shift)·scale` ≈ unit variance).
2. **Model** — a fresh `UniMedVLConfig` at small size with the trained VAE inside, randomly initialised.
3. **Curriculum** — the project's stages 1, 2, 3 (`run_curriculum`, shipped stage configs + overrides: steps, LR,
   batch, small resolutions, ViT unfrozen because it is random, VAE frozen) on: understanding = VQA-RAD train, a
   region question per VQA-RAD train image (organ label), and derived MedPix train questions (modality, body region,
   plane) on 4 views (whole, random crops and flips) of each image; text-to-image = MedPix train images from label prompts
   ("CT, axial, head") and captions; image-to-image = 2× super-resolution of MedPix train images.
4. **Final folder** (`OUTPUT/final`): config, `model.safetensors` (float32), tokenizer, processor, generation config,
   code files + `auto_map` — loadable with `from_pretrained` and the `Auto*` classes (Hub-ready). With `--ship` it is
   also installed, without the code files, as the package's default model `modeling_unimedvl/unimedvl_tiny/`.

Data is read in place from `--data` (never copied); derived JSONL files, resized copies and super-resolution pairs go
to `OUTPUT/data`. Held-out data (VQA-RAD test, MedPix dev) is never used here.
"""

import argparse
import json
import logging
import math
import os
import random
import shutil
import time

from PIL import Image

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

IMAGE_SIZE = 64
"""Generation resolution (VAE training, text-to-image, super-resolution): 64 px → 8×8 latents → 4×4 = 16 tokens."""
IMAGE_TRANSFORMS = {
    "understanding": [112, 56, 14, 112 * 112],
    "generation_vit": [112, 56, 14, 112 * 112],
    "generation_vae": [IMAGE_SIZE, 32, 16, IMAGE_SIZE * IMAGE_SIZE],
}
"""(max long side, min short side, stride, max pixels): ViT images ≤ 112 px, generation images ≤ 64 px."""
SR_TRANSFORM = tuple(IMAGE_TRANSFORMS["generation_vae"])
"""Size rule of the super-resolution pairs: the generation size."""

TEXT_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "hidden_act": "silu",
}
VISION_CONFIG = {
    "hidden_size": 96,
    "intermediate_size": 384,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "patch_size": 14,
    "image_size": 112,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
VAE_BLOCK_OUT_CHANNELS = (16, 32, 64, 64)
VAE_NORM_GROUPS = 16
VAE_CROP = 32
"""The VAE trains on random 32-px crops of the 64-px images (it is convolutional; 4x cheaper per sample)."""

DEFAULTS = {
    "vocab_size": 3000,
    "vae_steps": 1000,
    "vae_batch_size": 32,
    "vae_learning_rate": 2e-3,
    "vae_kl_weight": 1e-4,
    "vae_decoder_steps": 600,
    "stage_steps": (2000, 1800, 1800),
    "batch_size": 16,
    "learning_rate": 1e-3,
    "num_sr": 800,
    "num_views": 4,
}


def norm_region(row: dict) -> str:
    return REGIONS.get(row.get("Location Category"), "other")


def norm_plane(row: dict) -> str:
    return PLANES.get((row.get("Description") or {}).get("Plane") or "", "other")


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


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def training_text(data_dir: str) -> list[str]:
    """Every training-split text the model sees (and the prompt templates); no test/dev text."""
    with open(os.path.join(data_dir, "vqa_rad", "trainset.json")) as handle:
        vqa = json.load(handle)
    texts = [row["question"] for row in vqa] + [str(row["answer"]) for row in vqa]
    for row in medpix_rows(data_dir, "train"):
        description = row.get("Description") or {}
        texts += [description.get("Caption") or "", description.get("Modality") or "", row.get("Location") or ""]
        texts += [label_prompt(row)] + [f"{q} {a}" for q, a in medpix_questions(row)]
    for row in read_jsonl(os.path.join(data_dir, "medpix", "data_train.jsonl")):
        texts += [str(value) for key, value in row.items() if isinstance(value, str) and key not in ("U_id",)]
    texts += [MODALITY_QUESTION, REGION_QUESTION, PLANE_QUESTION, SR_INSTRUCTION]
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
        os.makedirs(output_dir, exist_ok=True)
        staging = output_dir + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        tokenizer.save(os.path.join(staging, "tokenizer.json"))
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
        with open(os.path.join(staging, "tokenizer_config.json"), "w") as handle:
            json.dump(config, handle, indent=2)
        shutil.rmtree(output_dir, ignore_errors=True)
        os.replace(staging, output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    for index, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != index:
            raise RuntimeError(f"{token} should have id {index} in the trained tokenizer.")
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# VAE (stage 0)
# ----------------------------------------------------------------------------------------------------------------------


def vae_config(scaling_factor: float = 1.0, shift_factor: float = 0.0) -> dict:
    from modeling_unimedvl.configuration_unimedvl import FLUX_VAE_CONFIG

    config = dict(FLUX_VAE_CONFIG)
    config.update(
        block_out_channels=list(VAE_BLOCK_OUT_CHANNELS),
        layers_per_block=1,
        norm_num_groups=VAE_NORM_GROUPS,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
    return config


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


def vae_image_paths(data_dir: str, split: str) -> list[str]:
    paths = [os.path.join(data_dir, "medpix", "images", f"{row['image']}.png") for row in medpix_rows(data_dir, split)]
    if split == "train":
        with open(os.path.join(data_dir, "vqa_rad", "trainset.json")) as handle:
            names = sorted({row["image_name"] for row in json.load(handle)})
        paths += [os.path.join(data_dir, "vqa_rad", "images", name) for name in names]
    return paths


def psnr(a, b) -> float:
    """Mean PSNR (dB) of images in [-1, 1]."""
    mse = (((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * (1.0 / mse).log10()).mean())


def train_vae(
    data_dir: str, output_dir: str, seed: int, steps: int, batch_size: int, learning_rate: float, kl_weight: float,
    decoder_steps: int,
) -> dict:
    """Trains the small FLUX-layout VAE (`steps` on crops, then `decoder_steps` of decoder fine-tuning); saves it
    (diffusers folder) with its latent statistics; returns the report."""
    import torch
    from diffusers import AutoencoderKL

    report_path = os.path.join(output_dir, "vae_report.json")
    if os.path.isfile(report_path):
        with open(report_path) as handle:
            report = json.load(handle)
        if "decoder_finetune" not in report:
            report = finetune_vae_decoder(data_dir, output_dir, report, seed, decoder_steps, batch_size, learning_rate / 2)
        return report
    torch.manual_seed(seed)
    start = time.perf_counter()
    train = load_square_images(vae_image_paths(data_dir, "train"))
    dev = load_square_images(vae_image_paths(data_dir, "dev"))
    vae = AutoencoderKL(**vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    history = []
    vae.train()
    for step in range(steps):
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
        loss = l1 + mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            history.append({"step": step, "l1": round(l1.item(), 4), "mse": round(mse.item(), 5), "kl": round(kl.item(), 3)})
            logger.info("VAE step %d: %s", step, history[-1])
            print(f"VAE step {step}: {history[-1]}", flush=True)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(train[i : i + 128]).latent_dist.sample(generator) for i in range(0, train.shape[0], 128)])
        shift = float(latents.mean())
        scale = float(1.0 / latents.std())
        recon = torch.cat([vae.decode(vae.encode(dev[i : i + 128]).latent_dist.mean).sample for i in range(0, dev.shape[0], 128)])
        bicubic = torch.nn.functional.interpolate(
            torch.nn.functional.interpolate(dev, scale_factor=0.125, mode="area"), scale_factor=8, mode="bicubic"
        )
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    vae.save_pretrained(os.path.join(output_dir, "vae"))
    report = {
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "kl_weight": kl_weight,
        "train_images": int(train.shape[0]),
        "dev_images": int(dev.shape[0]),
        "resolution": IMAGE_SIZE,
        "train_crop": VAE_CROP,
        "norm_num_groups": VAE_NORM_GROUPS,
        "block_out_channels": list(VAE_BLOCK_OUT_CHANNELS),
        "parameters": sum(p.numel() for p in vae.parameters()),
        "scaling_factor": scale,
        "shift_factor": shift,
        "dev_psnr": round(psnr(recon, dev), 2),
        "dev_psnr_8x_bicubic_baseline": round(psnr(bicubic, dev), 2),
        "first": history[0],
        "last": history[-1],
        "history": history,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    with open(report_path, "w") as handle:
        json.dump(report, handle, indent=1)
    return finetune_vae_decoder(data_dir, output_dir, report, seed, decoder_steps, batch_size, learning_rate / 2)


def finetune_vae_decoder(data_dir: str, output_dir: str, report: dict, seed: int, steps: int, batch_size: int, learning_rate: float) -> dict:
    """Phase 2 of the VAE stage: the encoder is frozen (so latents and their statistics stay as they are) and the
    decoder is fine-tuned on whole 64-px images decoded from posterior samples (L1 + MSE)."""
    import torch
    from diffusers import AutoencoderKL

    start = time.perf_counter()
    vae_dir = os.path.join(output_dir, "vae")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    train = load_square_images(vae_image_paths(data_dir, "train"))
    dev = load_square_images(vae_image_paths(data_dir, "dev"))
    vae.eval()
    with torch.no_grad():
        posteriors = [vae.encode(train[i : i + 128]).latent_dist for i in range(0, train.shape[0], 128)]
        means = torch.cat([p.mean for p in posteriors])
        stds = torch.cat([p.std for p in posteriors])
        flipped = [vae.encode(train[i : i + 128].flip(-1)).latent_dist for i in range(0, train.shape[0], 128)]
        means_f = torch.cat([p.mean for p in flipped])
        stds_f = torch.cat([p.std for p in flipped])
    decoder = [p for name, p in vae.named_parameters() if name.startswith(("decoder.", "post_quant_conv."))]
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in decoder:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder, lr=learning_rate, weight_decay=0.0, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    generator = torch.Generator().manual_seed(seed + 1)
    history = []
    vae.decoder.train()
    for step in range(steps):
        index = torch.randint(0, train.shape[0], (batch_size,), generator=generator)
        flip = (torch.rand(batch_size, generator=generator) < 0.5)[:, None, None, None]
        target = torch.where(flip, train[index].flip(-1), train[index])
        mean = torch.where(flip, means_f[index], means[index])
        std = torch.where(flip, stds_f[index], stds[index])
        latent = mean + std * torch.randn(mean.shape, generator=generator)
        reconstruction = vae.decode(latent).sample
        l1 = (reconstruction - target).abs().mean()
        mse = ((reconstruction - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        (l1 + mse).backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            history.append({"step": step, "l1": round(l1.item(), 4), "mse": round(mse.item(), 5)})
            print(f"VAE decoder step {step}: {history[-1]}", flush=True)
    vae.eval()
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(dev[i : i + 128]).latent_dist.mean).sample for i in range(0, dev.shape[0], 128)])
    vae.save_pretrained(vae_dir)
    report = dict(report)
    report["dev_psnr_phase1"] = report["dev_psnr"]
    report["dev_psnr"] = round(psnr(recon, dev), 2)
    report["decoder_finetune"] = {
        "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "first": history[0], "last": history[-1],
        "history": history, "wall_s": round(time.perf_counter() - start, 1),
    }
    report["wall_s"] = round(report["wall_s"] + report["decoder_finetune"]["wall_s"], 1)
    with open(os.path.join(output_dir, "vae_report.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def build_initial_model(tokenizer, vae_dir: str, output_dir: str, seed: int) -> str:
    """A random UniMedVL of the Tiny size with the trained VAE inside, saved in the converted layout."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import GenerationConfig, Qwen2Config, SiglipVisionConfig

    from modeling_unimedvl import UniMedVLConfig, UniMedVLForConditionalGeneration, UniMedVLImageProcessor, UniMedVLProcessor

    if os.path.isfile(os.path.join(output_dir, "config.json")):
        return output_dir
    vae = AutoencoderKL.from_pretrained(vae_dir)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    vocab = len(tokenizer)
    text_config = Qwen2Config(
        vocab_size=vocab,
        tie_word_embeddings=False,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        dtype=torch.float32,
        **{k: v for k, v in TEXT_CONFIG.items() if k != "rope_theta"},
        rope_parameters={"rope_type": "default", "rope_theta": TEXT_CONFIG["rope_theta"]},
    )
    vision_config = SiglipVisionConfig(**VISION_CONFIG, dtype=torch.float32)
    config = UniMedVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        vae_config=vae_config(vae.config.scaling_factor, vae.config.shift_factor),
        max_latent_size=IMAGE_SIZE // 16,
        vit_max_num_patch_per_side=VISION_CONFIG["image_size"] // VISION_CONFIG["patch_size"],
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
    missing, unexpected = model.model.vae.load_state_dict(vae.state_dict(), strict=True), None
    del missing, unexpected
    staging = output_dir + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    ).save_pretrained(staging)
    image_processor = UniMedVLImageProcessor(
        understanding_transform=tuple(IMAGE_TRANSFORMS["understanding"]),
        generation_vit_transform=tuple(IMAGE_TRANSFORMS["generation_vit"]),
        generation_vae_transform=tuple(IMAGE_TRANSFORMS["generation_vae"]),
    )
    UniMedVLProcessor(image_processor, tokenizer, latent_downsample=config.latent_downsample).save_pretrained(staging)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staging, output_dir)
    return output_dir


# ----------------------------------------------------------------------------------------------------------------------
# Curriculum data
# ----------------------------------------------------------------------------------------------------------------------


def _resized_copy(source: str, target: str, long_side: int) -> str:
    if not os.path.isfile(target):
        with Image.open(source) as image:
            image = image.convert("RGB")
            scale = min(1.0, long_side / max(image.size))
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image.resize(size, Image.BICUBIC).save(target)
    return target


def augmented_copies(source: str, out_dir: str, name: str, count: int, seed: int) -> list[str]:
    """`count` views of one training image for the understanding questions, ≤ 112 px: the whole image, then random
    crops (80–100 % of each side) with random horizontal flips (labels — modality, region, plane — are invariant)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{name}_v{index}.png") for index in range(count)]
    if all(os.path.isfile(path) for path in paths):
        return paths
    rng = random.Random(f"{seed}:{name}")
    long_side = IMAGE_TRANSFORMS["understanding"][0]
    with Image.open(source) as image:
        image = image.convert("RGB")
        for index, path in enumerate(paths):
            view = image
            if index > 0:
                width, height = (round(side * rng.uniform(0.8, 1.0)) for side in image.size)
                left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
                view = image.crop((left, top, left + width, top + height))
                if rng.random() < 0.5:
                    view = view.transpose(Image.FLIP_LEFT_RIGHT)
            scale = min(1.0, long_side / max(view.size))
            view.resize((max(1, round(view.width * scale)), max(1, round(view.height * scale))), Image.BICUBIC).save(path)
    return paths


def build_data(data_dir: str, out_dir: str, num_sr: int, seed: int, num_views: int = 1) -> dict:
    """Writes the JSONL files of the three data groups (training splits only); returns the `data:` config.

    Understanding: VQA-RAD train questions, a region question per VQA-RAD train image (its organ label) and the
    MedPix train modality / region / plane questions on `num_views` views of each image (`augmented_copies`)."""
    data_dir, out_dir = os.path.abspath(data_dir), os.path.abspath(out_dir)  # image paths in the JSONL are absolute
    os.makedirs(os.path.join(out_dir, "sr"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "vqa_rad_images"), exist_ok=True)
    with open(os.path.join(data_dir, "vqa_rad", "trainset.json")) as handle:
        vqa = json.load(handle)
    understanding = []
    organ_images = {}
    for row in vqa:
        image = _resized_copy(
            os.path.join(data_dir, "vqa_rad", "images", row["image_name"]),
            os.path.join(out_dir, "vqa_rad_images", os.path.splitext(row["image_name"])[0] + ".png"),
            128,
        )
        understanding.append(_und_row(image, row["question"], str(row["answer"])))
        if row.get("image_organ") in VQA_RAD_ORGANS:
            organ_images[image] = VQA_RAD_ORGANS[row["image_organ"]]
    understanding += [_und_row(image, REGION_QUESTION, region) for image, region in sorted(organ_images.items())]
    medpix = medpix_rows(data_dir, "train")
    medpix_images = os.path.join(data_dir, "medpix", "images")
    for row in medpix:
        source = os.path.join(medpix_images, f"{row['image']}.png")
        for image in augmented_copies(source, os.path.join(out_dir, "medpix_und"), row["image"], num_views, seed):
            understanding += [_und_row(image, question, answer) for question, answer in medpix_questions(row)]
    t2i = []
    for row in medpix:
        t2i.append(_t2i_row(f"{row['image']}.png", label_prompt(row)))
        caption = (row.get("Description") or {}).get("Caption")
        if caption:
            t2i.append(_t2i_row(f"{row['image']}.png", caption))
    rng = random.Random(seed)
    chosen = rng.sample(medpix, min(num_sr, len(medpix)))
    sr = []
    for row in chosen:
        low, high = sr_pair(
            os.path.join(medpix_images, f"{row['image']}.png"), os.path.join(out_dir, "sr"), row["image"], SR_TRANSFORM
        )
        sr.append(
            {
                "main_task_type": "image_editing",
                "sub_task_type": "super_resolution",
                "input_img": [{"path": low}],
                "output_img": [{"path": high}],
                # no reply text before the target: the sequence is then exactly the image-to-image inference context
                "message": [{"from": "human", "value": f"<image>\n{SR_INSTRUCTION}"}],
            }
        )
    return {
        "understanding": [{"jsonl": write_jsonl(os.path.join(out_dir, "understanding.jsonl"), understanding), "image_dir": out_dir}],
        "text_to_image": [{"jsonl": write_jsonl(os.path.join(out_dir, "t2i.jsonl"), t2i), "image_dir": medpix_images}],
        "interleaved": [{"jsonl": write_jsonl(os.path.join(out_dir, "sr.jsonl"), sr), "task": "image_to_image"}],
    }


def _und_row(image: str, question: str, answer: str) -> dict:
    return {
        "main_task_type": "understanding",
        "sub_task_type": "vqa",
        "input_img": [{"path": image}],
        "output_img": [],
        "message": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
    }


def _t2i_row(image_name: str, prompt: str) -> dict:
    return {
        "main_task_type": "generation",
        "sub_task_type": "t2i",
        "input_img": [],
        "output_img": [{"path": image_name}],
        "message": [{"from": "human", "value": prompt}],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Final folder
# ----------------------------------------------------------------------------------------------------------------------

SHIPPED_SUFFIXES = (".json", ".safetensors", ".py", ".jinja", ".txt")
NOT_SHIPPED = ("ema.safetensors", "training_summary.json")


def write_final(stage_final: str, output_dir: str, use_ema: bool, vae_dir: str) -> str:
    """Copies the last stage's model into `output_dir` (EMA weights if `use_ema`), without training leftovers.

    The VAE is frozen in every curriculum stage, so its weights are the stage-0 VAE's; they are written from `vae_dir`
    (the saved stage-0 VAE) so that the final folder always holds exactly that VAE.
    """
    import torch
    from safetensors.torch import load_file, save_file

    staging = output_dir + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for name in sorted(os.listdir(stage_final)):
        if name.endswith(SHIPPED_SUFFIXES) and name not in NOT_SHIPPED:
            shutil.copy2(os.path.join(stage_final, name), os.path.join(staging, name))
    weights = load_file(os.path.join(stage_final, "model.safetensors"))
    if use_ema:
        ema = load_file(os.path.join(stage_final, "ema.safetensors"))
        weights.update({key: value for key, value in ema.items() if key in weights})
    vae = load_file(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))
    for key, value in vae.items():
        if f"model.vae.{key}" not in weights or weights[f"model.vae.{key}"].shape != value.shape:
            raise RuntimeError(f"The stage-0 VAE in {vae_dir} does not match the model (model.vae.{key}).")
        weights[f"model.vae.{key}"] = value
    save_file({k: v.to(torch.float32).contiguous() for k, v in weights.items()}, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staging, output_dir)
    return output_dir


def ship_default_model(final_dir: str, target_dir: str) -> str:
    """Installs the final folder as the package's default model (`modeling_unimedvl/unimedvl_tiny/`).

    The package registers the UniMedVL classes itself, so the shipped copy holds no model code and no `auto_map`
    (the code files would be stale copies of the package's own modules); `final_dir` keeps both for the Hub.
    """
    staging = target_dir.rstrip(os.sep) + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for name in sorted(os.listdir(final_dir)):
        if not name.endswith(SHIPPED_SUFFIXES) or name.endswith(".py"):
            continue
        if name.endswith(".json"):
            with open(os.path.join(final_dir, name)) as handle:
                content = json.load(handle)
            content = _without_auto_map(content)
            with open(os.path.join(staging, name), "w") as handle:
                json.dump(content, handle, indent=2, sort_keys=True)
                handle.write("\n")
        else:
            shutil.copy2(os.path.join(final_dir, name), os.path.join(staging, name))
    shutil.rmtree(target_dir, ignore_errors=True)
    os.replace(staging, target_dir)
    return target_dir


def _without_auto_map(content):
    """A JSON value with every `auto_map` entry removed, at any depth (processor configs nest them)."""
    if isinstance(content, dict):
        return {key: _without_auto_map(value) for key, value in content.items() if key != "auto_map"}
    return content


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("UNIMEDVL_DATA_DIR", "../shared/data"))
    parser.add_argument("--output", default="outputs/unimedvl_tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=DEFAULTS["vocab_size"])
    parser.add_argument("--vae-steps", type=int, default=DEFAULTS["vae_steps"])
    parser.add_argument("--vae-decoder-steps", type=int, default=DEFAULTS["vae_decoder_steps"])
    parser.add_argument("--stage-steps", type=int, nargs=3, default=list(DEFAULTS["stage_steps"]), metavar=("S1", "S2", "S3"))
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--learning-rate", type=float, default=DEFAULTS["learning_rate"])
    parser.add_argument("--num-sr", type=int, default=DEFAULTS["num_sr"])
    parser.add_argument("--num-views", type=int, default=DEFAULTS["num_views"], help="views per MedPix image for the understanding questions")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--ema", action="store_true", help="ship the EMA weights of stage 3 instead of the last weights")
    parser.add_argument("--machine", default="2-core CPU dev box (shared)", help="machine description for the summary")
    parser.add_argument("--stop-after", choices=("tokenizer", "vae", "model", "data"), default=None)
    parser.add_argument("--ship", action="store_true", help="install the result as the package's default model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    output = os.path.abspath(args.output)
    os.makedirs(output, exist_ok=True)
    timings_path = os.path.join(output, "timings.json")
    timings = json.load(open(timings_path)) if os.path.isfile(timings_path) else {}

    def timed(name, function, *f_args, **f_kwargs):
        start = time.perf_counter()
        result = function(*f_args, **f_kwargs)
        if name not in timings:
            timings[name] = round(time.perf_counter() - start, 1)
            with open(timings_path, "w") as handle:
                json.dump(timings, handle, indent=1)
        return result

    tokenizer = timed("tokenizer_s", train_tokenizer, args.data, os.path.join(output, "tokenizer"), args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens", flush=True)
    if args.stop_after == "tokenizer":
        return {}
    vae_report = timed(
        "vae_s", train_vae, args.data, os.path.join(output, "vae_stage"), args.seed, args.vae_steps,
        DEFAULTS["vae_batch_size"], DEFAULTS["vae_learning_rate"], DEFAULTS["vae_kl_weight"], args.vae_decoder_steps,
    )
    print(f"VAE: dev PSNR {vae_report['dev_psnr']} dB (bicubic from 8x-downsampled: {vae_report['dev_psnr_8x_bicubic_baseline']} dB)", flush=True)
    if args.stop_after == "vae":
        return {}
    model_dir = build_initial_model(tokenizer, os.path.join(output, "vae_stage", "vae"), os.path.join(output, "model_init"), args.seed)
    if args.stop_after == "model":
        return {}
    data = timed("data_s", build_data, args.data, os.path.join(output, "data"), args.num_sr, args.seed, args.num_views)
    if args.stop_after == "data":
        return {}
    steps = args.stage_steps
    user_config = {
        "data": data,
        "image_transforms": IMAGE_TRANSFORMS,
        "max_tokens_per_sample": 512,
        "freeze": {"vit": False, "vae": True, "und": False, "gen": False},
        "training": {
            "learning_rate": args.learning_rate,
            "warmup_steps": 20,
            "per_device_train_batch_size": args.batch_size,
            "save_steps": 100,
            "save_total_limit": 1,
            "logging_steps": 10,
            "ema_decay": 0.99,
            "disable_tqdm": True,
            "seed": args.seed,
            "data_seed": args.seed,
            "dataloader_num_workers": 0,
        },
        "stages": {
            1: {"training": {"max_steps": steps[0]}},
            2: {"training": {"max_steps": steps[1]}},
            3: {"training": {"max_steps": steps[2], "lr_scheduler_type": "cosine"}},
        },
    }
    from .curriculum import run_curriculum

    finals = []
    for stage in (1, 2, 3):
        previous = model_dir if stage == 1 else finals[-1]
        finals += timed(f"stage{stage}_s", run_curriculum, [stage], _stage_only(user_config, stage), previous, output, use_cpu=True)
    final = write_final(finals[-1], os.path.join(output, "final"), args.ema, os.path.join(output, "vae_stage", "vae"))
    summary = {
        "command": "python -m unimedvl_training.build_unimedvl_tiny " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "seed": args.seed,
        "timings_s": timings,
        "vae": {k: v for k, v in vae_report.items() if k != "history"},
        "stages": [summarize(f"stage{i + 1}", f) for i, f in enumerate(finals)],
        "final": final,
        "use_ema": args.ema,
        "torch_threads": torch.get_num_threads(),
        "machine": args.machine,
        "vocab_size": len(tokenizer),
        "stage_steps": list(steps),
        "num_views": args.num_views,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        **_size_report(final),
    }
    if args.ship:
        from modeling_unimedvl.default_model import DEFAULT_MODEL_DIR

        summary["shipped"] = ship_default_model(final, DEFAULT_MODEL_DIR)
    with open(os.path.join(output, "build_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    print(json.dumps(summary, indent=1))
    return summary


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


if __name__ == "__main__":
    main()
