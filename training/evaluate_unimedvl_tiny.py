"""Held-out evaluation of UniMedVL-Tiny (or any small UniMedVL folder) with the project's evaluation harness.

    python -m unimedvl_training.evaluate_unimedvl_tiny --model modeling_unimedvl/unimedvl_tiny --data ../shared/data \
        --output outputs/unimedvl_tiny/eval --seed 0

Only held-out data is used:

- **VQA-RAD test** (451 questions) through `evaluate_vqa`; baseline: the training split's majority answer for closed
  questions ("no") and its most frequent open answer, scored by the same harness.
- **MedPix dev** derived questions (modality CT/MR, body region, plane) through `evaluate_vqa`; baseline: the training
  split's majority class of each question.
- **Vision probe**: linear read-outs of the understanding encoder's pooled features, fitted on MedPix train images and
  scored on MedPix dev (modality, region, plane): the reference of the MedPix question accuracies (the language
  model reads every patch token with its position, the probe their mean, so its answers land near it, not under it).
- **Text-to-image**: a small CNN (modality + region heads) trained here on MedPix *train* images at 64 px classifies
  images generated from the MedPix *dev* label prompts ("MR, sagittal, spine and muscles"); its accuracy on the real dev
  images is the reference, the dev frequency of the training majority class the baseline.
- **Image-to-image**: 2× super-resolution of every MedPix dev image at the generation size (≤ 64 px), PSNR / SSIM
  (harness `psnr_ssim`) against the bicubic input, beside the VAE's own reconstruction of the target.
- **Grid**: images for the card prompts (`CARD_PROMPTS`, 4 seeds each) as one PNG, with the classifier's verdicts.

Sampler settings are UniMedVL-Tiny's (`modeling_unimedvl.default_model.TINY_TEXT_TO_IMAGE` / `TINY_IMAGE_TO_IMAGE`,
which the quickstart and the demo use too). `--split train` runs the generation tasks on MedPix *train* prompts, to
choose sampler settings without looking at dev.

Writes `OUTPUT/results.json` in the format of `model_cards/build_model_cards.py --tiny-results` and
`OUTPUT/evaluation.json` with everything.
"""

import argparse
import collections
import json
import os
import time

from PIL import Image

from modeling_unimedvl.atomic_files import write_json
from modeling_unimedvl.default_model import TINY_IMAGE_TO_IMAGE, TINY_TEXT_TO_IMAGE

from .build_unimedvl_tiny import (
    IMAGE_SIZE,
    LABEL_NAMES,
    MODALITY_NAMES,
    MODALITY_QUESTION,
    PLANE_QUESTION,
    REGION_NAMES,
    REGION_QUESTION,
    SR_INSTRUCTION,
    SR_TRANSFORM,
    label_indices,
    label_prompt,
    load_square_images,
    medpix_questions,
    medpix_rows,
    norm_region,
    psnr,
    square_pixels,
)
from .run_tiny_curriculum import sr_pair


MODALITIES = list(MODALITY_NAMES)
QUESTION_TYPES = {MODALITY_QUESTION: "modality", REGION_QUESTION: "region", PLANE_QUESTION: "plane"}
CARD_PROMPTS = (
    "CT, axial, head",
    "MR, axial, head",
    "MR, sagittal, head",
    "MR, sagittal, spine and muscles",
    "CT, axial, thorax",
    "CT, axial, abdomen",
    "MR, coronal, abdomen",
    "CT, axial, reproductive and urinary system",
)
"""The prompts of the grid in the model card and the README (modality, plane, body region)."""
TARGETS = {
    "VQA-RAD closed accuracy (%)": "≥ 65",
    "VQA-RAD open recall (%)": "≥ 20",
    "MedPix modality question accuracy (%)": "≥ 95",
    "MedPix region question accuracy (%)": "≥ 70",
    "MedPix plane question accuracy (%)": "≥ 85",
    "Generated-image modality accuracy by classifier (%)": "≥ 95",
    "Generated-image region accuracy by classifier (%)": "≥ 70",
    "2x super-resolution PSNR (dB)": "> baseline",
    "2x super-resolution SSIM": "> baseline",
}
"""The targets of the project's issue 16 for UniMedVL-Tiny (shown beside the measured values in its card)."""


# ----------------------------------------------------------------------------------------------------------------------
# Classifier (modality + region) for generated images
# ----------------------------------------------------------------------------------------------------------------------


def make_classifier():
    import torch
    from torch import nn

    class LabelClassifier(nn.Module):
        """A small CNN on 64-px grey images with a modality head (CT/MR) and a region head (5 classes)."""

        def __init__(self):
            super().__init__()

            def block(cin, cout):
                return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

            self.features = nn.Sequential(block(1, 16), block(16, 32), block(32, 64), block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.dropout = nn.Dropout(0.2)
            self.modality = nn.Linear(64, len(MODALITIES))
            self.region = nn.Linear(64, len(REGION_NAMES))

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """`pixels` `[n, 3, 64, 64]` in [-1, 1] → modality logits `[n, 2]`, region logits `[n, 5]`."""
            features = self.dropout(self.features(pixels.mean(1, keepdim=True)))
            return self.modality(features), self.region(features)

    return LabelClassifier()


def medpix_labels(rows: list[dict]):
    import torch

    modality = torch.tensor([MODALITIES.index(row["Type"]) for row in rows])
    region = torch.tensor([REGION_NAMES.index(norm_region(row)) for row in rows])
    return modality, region


def majority_baselines(data_dir: str, rows: list[dict]) -> dict[str, float]:
    """How often each label kind of `rows` is the MedPix *train* majority class (the accuracy of always answering it):
    `{"modality_majority_baseline": ..., "region_majority_baseline": ...}`."""
    train_modality, train_region = medpix_labels(medpix_rows(data_dir, "train"))
    modality, region = medpix_labels(rows)
    return {
        "modality_majority_baseline": float((modality == train_modality.mode().values).float().mean()),
        "region_majority_baseline": float((region == train_region.mode().values).float().mean()),
    }


def vae_reconstruct(vae, pixels):
    """Images `[n, 3, H, W]` in [-1, 1] through the VAE (posterior mean), clamped to [-1, 1]."""
    import torch

    with torch.no_grad():
        return torch.cat([vae.decode(vae.encode(pixels[i : i + 128]).latent_dist.mean).sample for i in range(0, pixels.shape[0], 128)]).clamp(-1, 1)


def medpix_pixels(data_dir: str, rows: list[dict]):
    return load_square_images([os.path.join(data_dir, "medpix", "images", f"{r['image']}.png") for r in rows])


def train_classifier(data_dir: str, output_dir: str, seed: int, vae=None, epochs: int = 15):
    """Trains (or loads) the label classifier on MedPix train at 64 px; returns it with its dev accuracies.

    With `vae`, the training set is the train images plus their VAE reconstructions (so that the classifier judges
    the content of decoded images rather than their VAE blur), and the accuracy on VAE-reconstructed dev images is
    reported too. Augmentation: flips, shifts of up to 6 px, contrast ×0.9–1.1.
    """
    import torch
    from safetensors.torch import load_file, save_file

    name = "label_classifier_vae_aug.safetensors" if vae is not None else "label_classifier.safetensors"
    path = os.path.join(output_dir, name)
    classifier = make_classifier()
    train_rows, dev_rows = medpix_rows(data_dir, "train"), medpix_rows(data_dir, "dev")
    dev = medpix_pixels(data_dir, dev_rows)
    dev_modality, dev_region = medpix_labels(dev_rows)
    if os.path.isfile(path):
        classifier.load_state_dict(load_file(path))
    else:
        torch.manual_seed(seed)
        train = medpix_pixels(data_dir, train_rows)
        modality, region = medpix_labels(train_rows)
        if vae is not None:
            train = torch.cat([train, vae_reconstruct(vae, train)])
            modality, region = modality.repeat(2), region.repeat(2)
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-4)
        generator = torch.Generator().manual_seed(seed)
        steps_per_epoch = (train.shape[0] + 63) // 64
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
        for _ in range(epochs):
            classifier.train()
            order = torch.randperm(train.shape[0], generator=generator)
            for start in range(0, train.shape[0], 64):
                index = order[start : start + 64]
                batch = train[index]
                flip = torch.rand(len(index), generator=generator) < 0.5
                batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
                shift = torch.randint(-6, 7, (2,), generator=generator).tolist()
                batch = torch.roll(batch, shifts=shift, dims=(2, 3))
                batch = (batch * (1 + 0.2 * (torch.rand(len(index), 1, 1, 1, generator=generator) - 0.5))).clamp(-1, 1)
                logits_m, logits_r = classifier(batch)
                loss = torch.nn.functional.cross_entropy(logits_m, modality[index]) + torch.nn.functional.cross_entropy(logits_r, region[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        os.makedirs(output_dir, exist_ok=True)
        save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, path)
    classifier.eval()
    predicted_modality, predicted_region = classify(classifier, dev)
    real = {
        "modality_acc": float((predicted_modality == dev_modality).float().mean()),
        "region_acc": float((predicted_region == dev_region).float().mean()),
        "n": len(dev_rows),
        **majority_baselines(data_dir, dev_rows),
    }
    if vae is not None:
        predicted_modality, predicted_region = classify(classifier, vae_reconstruct(vae, dev))
        real["vae_reconstructed_modality_acc"] = float((predicted_modality == dev_modality).float().mean())
        real["vae_reconstructed_region_acc"] = float((predicted_region == dev_region).float().mean())
    real["classifier"] = path
    return classifier, real


def classify(classifier, pixels):
    import torch

    with torch.no_grad():
        outputs = [classifier(pixels[i : i + 128]) for i in range(0, pixels.shape[0], 128)]
    return torch.cat([o[0] for o in outputs]).argmax(-1), torch.cat([o[1] for o in outputs]).argmax(-1)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluations
# ----------------------------------------------------------------------------------------------------------------------


def vqa_rad(model, processor, checkpoint: str, data_dir: str, output_dir: str, seed: int, batch_size: int, limit=None) -> dict:
    from unimedvl_pipelines.evaluation import evaluate_vqa, score_vqa_predictions
    from unimedvl_pipelines.evaluation.records import load_vqa_records

    test = os.path.join(data_dir, "vqa_rad", "testset.json")
    result = evaluate_vqa(
        checkpoint, test, os.path.join(output_dir, "vqa_rad"), image_dir=os.path.join(data_dir, "vqa_rad", "images"),
        batch_size=batch_size, max_new_tokens=16, seed=seed, model=model, processor=processor, progress=False, limit=limit,
    )
    with open(os.path.join(data_dir, "vqa_rad", "trainset.json")) as handle:
        train = json.load(handle)
    closed = collections.Counter(str(r["answer"]).strip().lower() for r in train if r["answer_type"].strip() == "CLOSED")
    opened = collections.Counter(str(r["answer"]).strip().lower() for r in train if r["answer_type"].strip() == "OPEN")
    majority_closed, majority_open = closed.most_common(1)[0][0], opened.most_common(1)[0][0]
    records, _ = load_vqa_records(test, os.path.join(data_dir, "vqa_rad", "images"), limit)
    baseline_rows = [
        dict(record, prediction=majority_closed if record["answer_type"] == "CLOSED" else majority_open) for record in records
    ]
    baseline = score_vqa_predictions(baseline_rows)["overall"]
    return {
        "model": result["metrics"]["overall"],
        "by_question_type": result["metrics"].get("by_question_type"),
        "baseline": baseline,
        "baseline_answers": {"closed": majority_closed, "open": majority_open},
        "summary": result["files"] if "files" in result else None,
    }


def medpix_dev_questions(model, processor, checkpoint: str, data_dir: str, output_dir: str, seed: int, batch_size: int, limit=None) -> dict:
    from unimedvl_pipelines.evaluation import evaluate_vqa, normalize_answer

    rows = []
    for row in medpix_rows(data_dir, "dev"):
        for question, answer in medpix_questions(row):
            rows.append(
                {
                    "qid": f"{row['image']}:{QUESTION_TYPES[question]}",
                    "image_name": f"{row['image']}.png",
                    "question": question,
                    "answer": answer,
                    "answer_type": "CLOSED",
                    "question_type": QUESTION_TYPES[question],
                    "image_organ": norm_region(row),
                }
            )
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "medpix_dev_questions.json")
    with open(path, "w") as handle:
        json.dump(rows, handle)
    result = evaluate_vqa(
        checkpoint, path, os.path.join(output_dir, "medpix_dev"), image_dir=os.path.join(data_dir, "medpix", "images"),
        batch_size=batch_size, max_new_tokens=12, seed=seed, model=model, processor=processor, progress=False, limit=limit,
    )
    with open(result["predictions"]) as handle:
        predictions = [json.loads(line) for line in handle if line.strip()]
    train_answers = collections.defaultdict(collections.Counter)
    for row in medpix_rows(data_dir, "train"):
        for question, answer in medpix_questions(row):
            train_answers[QUESTION_TYPES[question]][answer] += 1
    out = {}
    for kind in ("modality", "region", "plane"):
        items = [p for p in predictions if p["question_type"] == kind]
        majority = train_answers[kind].most_common(1)[0][0]
        hits = [normalize_answer(p["prediction"]) == normalize_answer(p["answer"]) for p in items]
        base = [normalize_answer(majority) == normalize_answer(p["answer"]) for p in items]
        out[kind] = {
            "accuracy": sum(hits) / max(1, len(hits)),
            "majority_baseline": sum(base) / max(1, len(base)),
            "majority_answer": majority,
            "n": len(items),
            "predicted_answers": dict(collections.Counter(normalize_answer(p["prediction"]) for p in items).most_common(8)),
        }
    return out


PROBE_L2 = 1e-2
"""L2 weight of the vision probe's logistic regressions (fixed, not chosen on dev)."""


def pooled_image_features(model, processor, paths: list[str]):
    """Each image file as the understanding questions see it (processor `"understanding"` mode → ViT → connector →
    position table), averaged over its patches: `[len(paths), hidden]`."""
    import torch

    pooled = []
    with torch.no_grad():
        for path in paths:
            with Image.open(path) as image:
                inputs = processor.image_processor.preprocess([image], mode="understanding")
            pooled.append(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_hw"]).mean(0))
    return torch.stack(pooled)


def probe_labels(splits: dict[str, list[dict]], limit=None) -> dict:
    """Class indices of each `LABEL_NAMES` kind for the rows of each split (`label_indices`), `{kind: {split: [n]}}`
    (-1: no such label); refuses a sample with fewer than 2 labelled train rows or no labelled dev row of a kind."""
    import torch

    indices = {split: torch.tensor([label_indices(row) for row in rows], dtype=torch.long).reshape(-1, len(LABEL_NAMES)) for split, rows in splits.items()}
    labels = {}
    for column, kind in enumerate(LABEL_NAMES):
        labels[kind] = {split: values[:, column] for split, values in indices.items()}
        counts = {split: int((values >= 0).sum()) for split, values in labels[kind].items()}
        if counts["train"] < 2 or counts["dev"] < 1:
            raise ValueError(
                f"vision_probe: {counts['train']} MedPix train and {counts['dev']} dev images with a {kind} label in the "
                f"sample (limit {limit}); it needs at least 2 and 1: raise --limit or leave it out."
            )
    return labels


def fit_probe(train_inputs, train_targets, num_classes: int, seed: int):
    """A logistic regression `[n, hidden]` → `[n, num_classes]` fitted by L-BFGS with L2 weight `PROBE_L2`."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    head = nn.Linear(train_inputs.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = nn.functional.cross_entropy(head(train_inputs), train_targets) + PROBE_L2 * head.weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return head


def vision_probe(model, processor, data_dir: str, seed: int, limit=None) -> dict:
    """The reference of the MedPix question accuracies: per label kind (`LABEL_NAMES`), a logistic regression
    (`fit_probe`) on the standardised pooled features (`pooled_image_features`) of the MedPix train images, scored on
    MedPix dev (`limit`: a random sample of each split). The language model reads the same features (every patch
    token, not their mean), so its answers to the MedPix questions stay near it."""
    import torch

    splits = {split: sampled_rows(data_dir, split, limit, seed) for split in ("train", "dev")}
    labels = probe_labels(splits, limit)
    features = {
        split: pooled_image_features(model, processor, [os.path.join(data_dir, "medpix", "images", f"{row['image']}.png") for row in rows])
        for split, rows in splits.items()
    }
    mean, std = features["train"].mean(0), features["train"].std(0, correction=0) + 1e-6
    out = {}
    for kind, names in LABEL_NAMES.items():
        known = {split: values >= 0 for split, values in labels[kind].items()}
        inputs = {split: ((features[split] - mean) / std)[known[split]] for split in splits}
        targets = {split: labels[kind][split][known[split]] for split in splits}
        head = fit_probe(inputs["train"], targets["train"], len(names), seed)
        with torch.no_grad():
            predicted = head(inputs["dev"]).argmax(-1)
        majority = torch.bincount(targets["train"], minlength=len(names)).argmax()
        out[kind] = {
            "accuracy": (predicted == targets["dev"]).float().mean().item(),
            "majority_baseline": (targets["dev"] == majority).float().mean().item(),
            "n": len(targets["dev"]),
            "train_n": len(targets["train"]),
        }
    return out


def sampled_rows(data_dir: str, split: str, count: int | None, seed: int) -> list[dict]:
    """The MedPix `split` rows, or `count` of them drawn at random (seeded, kept in file order) when `count` is set.
    The files are sorted by case, so their first rows are not a sample: the first 160 train rows are all CT."""
    import random

    rows = medpix_rows(data_dir, split)
    if count is None or count >= len(rows):
        return rows
    return [rows[index] for index in sorted(random.Random(f"{seed}:{split}").sample(range(len(rows)), count))]


def text_to_image(model, processor, classifier, data_dir: str, output_dir: str, seed: int, sampling: dict, batch_size: int, limit=None, split: str = "dev") -> dict:
    """Generates one image per MedPix `split` label prompt (`limit`: a random sample of them, `sampled_rows`) and
    classifies it (`split="train"`: for choosing the sampling settings without touching dev)."""
    import torch

    from unimedvl_pipelines.evaluation.runner import generate_images, in_batches, item_seed

    rows = sampled_rows(data_dir, split, limit, seed)
    images_dir = os.path.join(output_dir, "t2i")
    os.makedirs(images_dir, exist_ok=True)
    images = []
    for batch in in_batches(rows, batch_size):
        prompts = [label_prompt(row) for row in batch]
        seeds = [item_seed(seed, row["image"]) for row in batch]
        generated = generate_images(model, processor, prompts, seeds, dict(sampling, height=IMAGE_SIZE, width=IMAGE_SIZE))
        for row, image in zip(batch, generated):
            image.save(os.path.join(images_dir, f"{row['image']}.png"))
        images += generated
    pixels = square_pixels(images)
    predicted_modality, predicted_region = classify(classifier, pixels)
    modality, region = medpix_labels(rows)
    return {
        "split": split,
        "n": len(rows),
        "modality_acc": float((predicted_modality == modality).float().mean()),
        "region_acc": float((predicted_region == region).float().mean()),
        **majority_baselines(data_dir, rows),
        "modality_chance": 1 / len(MODALITIES),
        "region_chance": 1 / len(REGION_NAMES),
        "sampling": {k: list(v) if isinstance(v, tuple) else v for k, v in sampling.items()},
        "images": images_dir,
        "predicted_modality_counts": torch.bincount(predicted_modality, minlength=2).tolist(),
        "predicted_region_counts": torch.bincount(predicted_region, minlength=5).tolist(),
    }


def grey_tensor(image: Image.Image):
    """`[1, H, W]` float32 grey values in 0–255 (the scale `psnr_ssim` takes with its default data range)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))[None]


def super_resolution(model, processor, data_dir: str, output_dir: str, seed: int, sampling: dict, batch_size: int, count: int | None = None, split: str = "dev") -> dict:
    """2× super-resolution of every MedPix `split` image (`count`: a random sample of them, `sampled_rows`) at the
    generation size: the input is the image halved and enlarged back (bicubic), the target the image; PSNR / SSIM of
    the model's output and of the bicubic input against the target (grey, 8 bit), and of the target's own VAE
    reconstruction (what any output decoded by this VAE can reach). Batches hold images of one size."""
    import torch

    from unimedvl_pipelines.evaluation.image_metrics import psnr_ssim
    from unimedvl_pipelines.evaluation.runner import generate_images, in_batches, item_seed

    rows = sampled_rows(data_dir, split, count, seed)
    pairs_dir = os.path.join(output_dir, "sr_pairs" if split == "dev" else f"sr_pairs_{split}")
    os.makedirs(pairs_dir, exist_ok=True)
    by_size: dict[tuple[int, int], list] = {}
    for row in rows:
        low, high = sr_pair(os.path.join(data_dir, "medpix", "images", f"{row['image']}.png"), pairs_dir, row["image"], SR_TRANSFORM)
        with Image.open(low) as image_low, Image.open(high) as image_high:
            by_size.setdefault(image_low.size, []).append((row["image"], image_low.convert("RGB"), image_high.convert("L")))
    scores = {"model": [], "bicubic": [], "vae": []}
    vae = model.model.vae
    for size in sorted(by_size):
        for batch in in_batches(by_size[size], batch_size):
            outputs = generate_images(
                model, processor, [SR_INSTRUCTION] * len(batch), [item_seed(seed, name) for name, _, _ in batch], sampling,
                conditions=[low for _, low, _ in batch],
            )
            targets = torch.stack([grey_tensor(high) for _, _, high in batch])
            with torch.no_grad():
                reconstructed = vae.decode(vae.encode(targets.expand(-1, 3, -1, -1) / 127.5 - 1).latent_dist.mean).sample
            reconstructed = ((reconstructed.clamp(-1, 1).mean(1, keepdim=True) + 1) * 127.5).round()
            for (name, low, high), output, target, vae_image in zip(batch, outputs, targets, reconstructed):
                output.save(os.path.join(pairs_dir, f"{name}_model.png"))
                scores["model"].append(psnr_ssim(grey_tensor(output), target))
                scores["bicubic"].append(psnr_ssim(grey_tensor(low), target))
                scores["vae"].append(psnr_ssim(vae_image, target))

    def mean(kind, index):
        return sum(s[index] for s in scores[kind]) / max(1, len(scores[kind]))

    return {
        "split": split,
        "n": len(scores["model"]),
        "psnr": mean("model", 0),
        "ssim": mean("model", 1),
        "bicubic_psnr": mean("bicubic", 0),
        "bicubic_ssim": mean("bicubic", 1),
        "vae_reconstruction_psnr": mean("vae", 0),
        "vae_reconstruction_ssim": mean("vae", 1),
        "model_beats_bicubic_fraction": sum(m[0] > b[0] for m, b in zip(scores["model"], scores["bicubic"])) / max(1, len(scores["model"])),
        "sizes": {f"{w}x{h}": len(items) for (w, h), items in sorted(by_size.items())},
        "sampling": {k: list(v) if isinstance(v, tuple) else v for k, v in sampling.items()},
    }


def prompt_grid(model, processor, prompts, seeds: list[int], sampling: dict, path: str, classifier=None, scale: int = 2) -> dict:
    """A PNG grid of generated images: one row per prompt, one column per seed, each image enlarged `scale`× (nearest
    neighbour); with `classifier`, each row's modality / region predictions are returned too."""
    from unimedvl_pipelines.evaluation.runner import generate_images

    side = IMAGE_SIZE * scale
    grid = Image.new("RGB", (side * len(seeds), side * len(prompts)), "white")
    rows = {}
    for r, prompt in enumerate(prompts):
        images = generate_images(model, processor, [prompt] * len(seeds), seeds, dict(sampling, height=IMAGE_SIZE, width=IMAGE_SIZE))
        for c, image in enumerate(images):
            grid.paste(image.resize((side, side), Image.NEAREST), (c * side, r * side))
        if classifier is not None:
            modality, region = classify(classifier, square_pixels(images))
            rows[prompt] = {"modality": [MODALITIES[i] for i in modality.tolist()], "region": [REGION_NAMES[i] for i in region.tolist()]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path, optimize=True)
    return {
        "path": path, "prompts": list(prompts), "seeds": list(seeds), "classified": rows, "size": IMAGE_SIZE,
        "sampling": {k: list(v) if isinstance(v, tuple) else v for k, v in sampling.items()},
    }


def card_results(evaluation: dict) -> dict:
    """The `--tiny-results` JSON of build_model_cards.py: metric → {value, baseline, dataset} (percent / dB)."""
    results = {}
    vqa = evaluation.get("vqa_rad")
    if vqa:
        for key, name in (("closed_acc", "VQA-RAD closed accuracy (%)"), ("open_recall", "VQA-RAD open recall (%)"), ("overall_acc", "VQA-RAD overall strict accuracy (%)")):
            if vqa["model"].get(key) is not None:
                results[name] = {"value": round(100 * vqa["model"][key], 1), "baseline": round(100 * vqa["baseline"][key], 1), "dataset": "VQA-RAD test (451)"}
    for kind, block in (evaluation.get("medpix_questions") or {}).items():
        results[f"MedPix {kind} question accuracy (%)"] = {
            "value": round(100 * block["accuracy"], 1), "baseline": round(100 * block["majority_baseline"], 1), "dataset": f"MedPix 2.0 dev ({block['n']})",
        }
    t2i = evaluation.get("text_to_image")
    if t2i:
        for kind in ("modality", "region"):
            results[f"Generated-image {kind} accuracy by classifier (%)"] = {
                "value": round(100 * t2i[f"{kind}_acc"], 1), "baseline": round(100 * t2i[f"{kind}_majority_baseline"], 1), "dataset": f"MedPix 2.0 {t2i.get('split', 'dev')} prompts ({t2i['n']})",
            }
    real = evaluation.get("classifier_on_real_dev")
    baselines = real if real and "region_majority_baseline" in real else t2i  # records before 2026-12-07: the t2i one
    if real and baselines:
        for kind in ("modality", "region"):
            results[f"Label classifier on real dev images, {kind} (%) (reference)"] = {
                "value": round(100 * real[f"{kind}_acc"], 1), "baseline": round(100 * baselines[f"{kind}_majority_baseline"], 1), "dataset": f"MedPix 2.0 dev images ({real['n']})",
            }
    for kind, block in (evaluation.get("vision_probe") or {}).items():
        results[f"Vision-encoder linear probe, {kind} (%) (reference)"] = {
            "value": round(100 * block["accuracy"], 1), "baseline": round(100 * block["majority_baseline"], 1), "dataset": f"MedPix 2.0 dev images ({block['n']})",
        }
    sr = evaluation.get("super_resolution")
    if sr:
        dataset = f"MedPix 2.0 {sr.get('split', 'dev')}, ≤ 64 px ({sr['n']})"
        results["2x super-resolution PSNR (dB)"] = {"value": round(sr["psnr"], 2), "baseline": round(sr["bicubic_psnr"], 2), "dataset": dataset}
        results["2x super-resolution SSIM"] = {"value": round(sr["ssim"], 3), "baseline": round(sr["bicubic_ssim"], 3), "dataset": dataset}
        results["VAE reconstruction of the SR targets, PSNR (dB) (bound)"] = {"value": round(sr["vae_reconstruction_psnr"], 2), "baseline": round(sr["bicubic_psnr"], 2), "dataset": dataset}
    for name, target in TARGETS.items():
        if name in results:
            results[name]["target"] = target
    return results


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="modeling_unimedvl/unimedvl_tiny")
    parser.add_argument("--data", default=os.environ.get("UNIMEDVL_DATA_DIR", "../shared/data"))
    parser.add_argument("--output", default="outputs/unimedvl_tiny/eval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="at most this many items per task (smoke runs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tasks", nargs="+", default=["vqa_rad", "medpix_questions", "vision_probe", "text_to_image", "super_resolution", "grid"])
    parser.add_argument("--split", default="dev", choices=("dev", "train"), help="MedPix split of the generation tasks (train: to tune sampling without touching dev)")
    parser.add_argument("--cfg-text-scale", type=float, default=TINY_TEXT_TO_IMAGE["cfg_text_scale"])
    parser.add_argument("--steps", type=int, default=TINY_TEXT_TO_IMAGE["num_inference_steps"])
    parser.add_argument("--sr-steps", type=int, default=TINY_IMAGE_TO_IMAGE["num_inference_steps"])
    parser.add_argument("--grid", default=None, help="PNG path of the card grid (default: OUTPUT/card_grid.png)")
    args = parser.parse_args(argv)

    import torch

    from unimedvl_pipelines.evaluation.runner import load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output, exist_ok=True)
    evaluation_path = os.path.join(args.output, "evaluation.json")
    evaluation = json.load(open(evaluation_path)) if os.path.isfile(evaluation_path) else {}
    evaluation.setdefault("timings_s", {})
    model, processor = load_checkpoint(args.model, "cpu", "float32")
    sampling = dict(TINY_TEXT_TO_IMAGE, cfg_text_scale=args.cfg_text_scale, num_inference_steps=args.steps)
    sr_sampling = dict(TINY_IMAGE_TO_IMAGE, num_inference_steps=args.sr_steps)
    classifier = None
    for task in args.tasks:
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        if task in ("text_to_image", "grid") and classifier is None:
            classifier, evaluation["classifier_on_real_dev"] = train_classifier(args.data, args.output, args.seed, vae=model.model.vae)
        if task == "vqa_rad":
            evaluation[task] = vqa_rad(model, processor, args.model, args.data, args.output, args.seed, args.batch_size, args.limit)
        elif task == "medpix_questions":
            evaluation[task] = medpix_dev_questions(model, processor, args.model, args.data, args.output, args.seed, args.batch_size, args.limit)
        elif task == "vision_probe":
            evaluation[task] = vision_probe(model, processor, args.data, args.seed, args.limit)
        elif task == "text_to_image":
            evaluation[task] = text_to_image(model, processor, classifier, args.data, args.output, args.seed, sampling, args.batch_size, args.limit, args.split)
        elif task == "super_resolution":
            evaluation[task] = super_resolution(model, processor, args.data, args.output, args.seed, sr_sampling, args.batch_size, args.limit, args.split)
        elif task == "grid":
            path = args.grid or os.path.join(args.output, "card_grid.png")
            evaluation[task] = prompt_grid(model, processor, CARD_PROMPTS, [0, 1, 2, 3], sampling, path, classifier)
        else:
            raise ValueError(f"unknown task {task!r}")
        evaluation["timings_s"][task] = round(time.perf_counter() - start, 1)
        evaluation["model"] = os.path.abspath(args.model)
        write_json(evaluation_path, evaluation, indent=1)
        print(task, json.dumps(evaluation[task], indent=1)[:2000], flush=True)
    results = card_results(evaluation)
    write_json(os.path.join(args.output, "results.json"), results, indent=1)
    print(json.dumps(results, indent=1))
    return evaluation


if __name__ == "__main__":
    main()
