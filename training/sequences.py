"""Training sequences of UniMedVL: a record's sequence plan, its token sequence, and padded batches.

A sample becomes a plan of items (`text`, `vit` image, `vae` image) exactly as in the original data loaders, then one
token sequence in the model's format (text segment `<|im_start|> … <|im_end|>`, image block `<|vision_start|>`
placeholders `<|vision_end|>`). A noised VAE target (`vae` item with `noised=True`) is invisible to later tokens and
does not advance the RoPE position (the model derives this from `input_ids` and `latent_timesteps`); when later items
follow it, the builder appends a clean copy (clean VAE block + ViT block) that they can see, as the original's
interleaved format does.

Batches are right-padded `[rows, length]`: one sample per row, or several samples packed into token-budgeted rows
(`UniMedVLDataCollator(pack_tokens=N)`), whose `sample_ids` keep attention inside each sample.
"""

import logging
import random
from dataclasses import dataclass

import torch
from modeling_unimedvl.image_processing_unimedvl import target_size

from .data import DEFAULT_T2I_ANSWER, IMAGE_PLACEHOLDER, image_size, open_image


logger = logging.getLogger(__name__)


@dataclass
class CFGDropout:
    """Probabilities of dropping a condition item (`enable_cfg`) for classifier-free guidance (BAGEL defaults)."""

    text: float = 0.1
    vit: float = 0.3
    vae: float = 0.3


@dataclass
class PlanItem:
    """One item of a sequence plan: `kind` ∈ {text, vit, vae}; `image` indexes input + output images."""

    kind: str
    text: str | None = None
    image: int | None = None
    loss: bool = False
    noised: bool = False
    enable_cfg: bool = False


def sequence_plan(row: dict) -> list[PlanItem]:
    """The original's sequence plan of a normalised record (see `data.TASKS`)."""
    task, messages = row["task"], row["messages"]
    num_inputs = len(row["input_images"])
    plan: list[PlanItem] = []
    if task == "understanding":
        placed = sum(m["value"].count(IMAGE_PLACEHOLDER) for m in messages) > 0
        if not placed:
            plan += [PlanItem("vit", image=index) for index in range(num_inputs)]
        next_image = 0
        for message in messages:
            if message["from"] == "gpt":
                plan.append(PlanItem("text", text=message["value"], loss=True))
                continue
            for index, piece in enumerate(message["value"].split(IMAGE_PLACEHOLDER)):
                if index > 0:
                    plan.append(PlanItem("vit", image=next_image))
                    next_image += 1
                if piece.strip():
                    plan.append(PlanItem("text", text=piece.strip()))
        return plan

    for index in range(num_inputs):
        plan.append(PlanItem("vae", image=index, enable_cfg=True))
        plan.append(PlanItem("vit", image=index, enable_cfg=True))
    prompt = " ".join(m["value"].replace(IMAGE_PLACEHOLDER, "").strip() for m in messages if m["from"] == "human")
    answers = [m["value"].strip() for m in messages if m["from"] == "gpt" and m["value"].strip()]
    plan.append(PlanItem("text", text=prompt.strip(), enable_cfg=True))
    targets = [PlanItem("vae", image=num_inputs + index, loss=True, noised=True) for index in range(len(row["output_images"]))]
    if task == "counterfactual":
        plan += targets + [PlanItem("text", text=answer, loss=True) for answer in answers]
    else:
        if task == "text_to_image" and not answers:
            answers = [DEFAULT_T2I_ANSWER]
        plan += [PlanItem("text", text=answer, loss=True) for answer in answers] + targets
    return _with_clean_copies(plan)


def _with_clean_copies(plan: list[PlanItem]) -> list[PlanItem]:
    """Inserts a clean VAE + ViT copy after every noised target that later items follow."""
    result = []
    for position, item in enumerate(plan):
        result.append(item)
        if item.noised and position < len(plan) - 1:
            result.append(PlanItem("vae", image=item.image))
            result.append(PlanItem("vit", image=item.image))
    return result


class SequenceBuilder:
    """Builds the token sequence, labels, positions and image tensors of one record.

    Uses the processor's tokenizer, special tokens and image processor (its `understanding_transform` for ViT images
    of understanding samples; `generation_vae_transform`, then `generation_vit_transform`, for images of generation
    samples). Returns a dict with `input_ids`, `labels` (-100 outside answer tokens), `position_ids` (lists),
    `pixel_values` `[num_patches, 3*14*14]` / `image_grid_hw` `[n_vit, 2]` (or `None`), `vae_pixel_values` (list of
    `[3, H, W]`) and `latent_noised` (list of bool, one per VAE image).
    """

    def __init__(self, processor, cfg_dropout: CFGDropout | None = None):
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.ids = processor.special_ids
        self.latent_downsample = processor.latent_downsample
        self.cfg_dropout = cfg_dropout or CFGDropout(0.0, 0.0, 0.0)

    # ------------------------------------------------------------------ sizes

    def _vit_size(self, size: tuple[int, int], generation: bool) -> tuple[int, int]:
        processor = self.image_processor
        if generation:
            size = target_size(*size, processor.generation_vae_transform)
            return target_size(*size, processor.generation_vit_transform)
        return target_size(*size, processor.understanding_transform)

    def _vae_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return target_size(*size, self.image_processor.generation_vae_transform)

    def num_tokens(self, row: dict) -> int:
        """Sequence length of `row` without CFG dropout (image sizes from the file headers)."""
        images = [image_size(entry) for entry in row["input_images"] + row["output_images"]]
        generation = row["task"] != "understanding"
        patch = self.image_processor.patch_size
        total = 0
        for item in sequence_plan(row):
            if item.kind == "text":
                total += len(self.tokenizer(item.text, add_special_tokens=False)["input_ids"]) + 2
            elif item.kind == "vit":
                width, height = self._vit_size(images[item.image], generation)
                total += (width // patch) * (height // patch) + 2
            else:
                width, height = self._vae_size(images[item.image])
                total += (width // self.latent_downsample) * (height // self.latent_downsample) + 2
        return total

    # ------------------------------------------------------------------ building

    def __call__(self, row: dict, rng: random.Random | None = None) -> dict:
        rng = rng or random.Random(0)
        generation = row["task"] != "understanding"
        images = [self.image_processor.load(open_image(e)) for e in row["input_images"] + row["output_images"]]
        vae_cache: dict[int, object] = {}
        ids = self.ids
        input_ids, labels, positions = [], [], []
        patches, grids, vae_pixels, noised = [], [], [], []
        rope = 0
        for item in sequence_plan(row):
            if item.enable_cfg and rng.random() < getattr(self.cfg_dropout, item.kind):
                rope += 0 if item.kind == "text" else 1  # the original still advances the position for a dropped image
                continue
            if item.kind == "text":
                tokens = self.tokenizer(item.text, add_special_tokens=False)["input_ids"]
                segment = [ids["bos"]] + tokens + [ids["eos"]]
                input_ids += segment
                labels += [-100] + (tokens + [ids["eos"]] if item.loss else [-100] * (len(tokens) + 1))
                positions += list(range(rope, rope + len(segment)))
                rope += len(segment)
                continue
            if item.kind == "vit":
                image = images[item.image]
                if generation:
                    image = self._vae_image(images, item.image, vae_cache)
                    image = self.image_processor.resize(image, self.image_processor.generation_vit_transform)
                else:
                    image = self.image_processor.resize(image, self.image_processor.understanding_transform)
                image_patches, grid = self.image_processor.patchify(self.image_processor.to_tensor(image))
                patches.append(image_patches)
                grids.append(grid)
                count, placeholder = image_patches.shape[0], ids["image"]
            else:
                image = self._vae_image(images, item.image, vae_cache)
                vae_pixels.append(self.image_processor.to_tensor(image))
                noised.append(item.noised)
                count = (image.size[0] // self.latent_downsample) * (image.size[1] // self.latent_downsample)
                placeholder = ids["latent"]
            block = [ids["vision_start"]] + [placeholder] * count + [ids["vision_end"]]
            input_ids += block
            labels += [-100] * len(block)
            positions += [rope] * len(block)
            rope += 0 if item.noised else 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": positions,
            "pixel_values": torch.cat(patches) if patches else None,
            "image_grid_hw": torch.tensor(grids, dtype=torch.long) if grids else None,
            "vae_pixel_values": vae_pixels,
            "latent_noised": noised,
        }

    def _vae_image(self, images, index, cache):
        if index not in cache:
            cache[index] = self.image_processor.resize(images[index], self.image_processor.generation_vae_transform)
        return cache[index]


class _SampleBuilding:
    """Builds training samples from records; CFG dropout and the sample's `noise_seed` (timesteps and latent noise,
    see `UniMedVLTrainer`) come from a generator seeded by `(seed, epoch, index)`."""

    def __init__(self, records, builder: SequenceBuilder, seed: int = 0):
        self.records = records
        self.builder = builder
        self.seed = seed
        self.epoch = 0
        self.runtime_failures = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def build(self, row: dict, index: int) -> dict:
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        sample = self.builder(row, rng)
        sample["noise_seed"] = rng.getrandbits(63)
        return sample


class UniMedVLTrainingDataset(_SampleBuilding, torch.utils.data.Dataset):
    """Map-style dataset of built samples over a normalised `datasets.Dataset` of records.

    A sample is the same whenever it is built again (resumed runs, data-loader workers, any number of processes): its
    randomness is seeded by `(seed, epoch, index)`. The Trainer calls `set_epoch` every epoch. A row that fails to load
    at run time (e.g. a file removed after validation) is replaced by the next row and counted in `runtime_failures`.
    """

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.records)):
            row_index = (index + attempt) % len(self.records)
            try:
                return self.build(self.records[row_index], row_index)
            except (OSError, ValueError) as error:
                self.runtime_failures += 1
                logger.warning("Skipping training row %d: %s", row_index, error)
        raise RuntimeError("No training row could be loaded.")


class UniMedVLIterableTrainingDataset(_SampleBuilding, torch.utils.data.IterableDataset):
    """Built samples over a streaming `datasets.IterableDataset` of records (seeded by the position in the stream);
    rows that fail to load are skipped and counted in `runtime_failures`."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.records.set_epoch(epoch)

    def __iter__(self):
        for index, row in enumerate(self.records):
            try:
                yield self.build(row, index)
            except (OSError, ValueError) as error:
                self.runtime_failures += 1
                logger.warning("Skipping streamed training row %d: %s", index, error)


def built_dataset(records, builder: SequenceBuilder, seed: int = 0):
    """`UniMedVLTrainingDataset` for a `datasets.Dataset` of records, `UniMedVLIterableTrainingDataset` for a
    streaming `datasets.IterableDataset`."""
    import datasets

    if isinstance(records, datasets.IterableDataset):
        return UniMedVLIterableTrainingDataset(records, builder, seed)
    return UniMedVLTrainingDataset(records, builder, seed)


class UniMedVLDataCollator:
    """Collates built samples into right-padded `[rows, length]` batches: one sample per row, or packed.

    With `pack_tokens`, consecutive samples share a row as long as it holds at most `pack_tokens` tokens (a longer
    sample gets a row of its own); `sample_ids` `[rows, length]` (-1 on padding) then confine attention to each sample
    and every sample keeps its own `position_ids`. Returns `input_ids`, `attention_mask`, `position_ids`, `labels`
    `[rows, length]`; `pixel_values` and `image_grid_hw` of all ViT images; `vae_pixel_values` (list of `[3, H, W]`)
    and `latent_noised` `[num_vae_images]` (bool) in the order of the image blocks in `input_ids` (row-major); for
    samples from `UniMedVLTrainingDataset`, `noise_seeds` and `vae_images_per_sample` (one per sample).
    """

    def __init__(self, pad_token_id: int, pack_tokens: int | None = None):
        if pack_tokens is not None and pack_tokens <= 0:
            raise ValueError(f"pack_tokens must be a positive number of tokens, got {pack_tokens}.")
        self.pad_token_id = pad_token_id
        self.pack_tokens = pack_tokens

    def rows(self, samples: list[dict]) -> list[list[dict]]:
        """Samples grouped into rows, in order."""
        if self.pack_tokens is None:
            return [[sample] for sample in samples]
        rows, used = [], 0
        for sample in samples:
            if rows and used + len(sample["input_ids"]) <= self.pack_tokens:
                rows[-1].append(sample)
                used += len(sample["input_ids"])
            else:
                rows.append([sample])
                used = len(sample["input_ids"])
        return rows

    def __call__(self, samples: list[dict]) -> dict:
        rows = self.rows(samples)
        length = max(sum(len(sample["input_ids"]) for sample in row) for row in rows)
        shape = (len(rows), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, -100, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        sample_ids = torch.full(shape, -1, dtype=torch.long)
        for row_index, row in enumerate(rows):
            start = 0
            for sample_index, sample in enumerate(row):
                end = start + len(sample["input_ids"])
                input_ids[row_index, start:end] = torch.tensor(sample["input_ids"])
                labels[row_index, start:end] = torch.tensor(sample["labels"])
                position_ids[row_index, start:end] = torch.tensor(sample["position_ids"])
                attention_mask[row_index, start:end] = 1
                sample_ids[row_index, start:end] = sample_index
                start = end
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}
        if self.pack_tokens is not None:
            out["sample_ids"] = sample_ids
        patches = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        if patches:
            out["pixel_values"] = torch.cat(patches)
            out["image_grid_hw"] = torch.cat([s["image_grid_hw"] for s in samples if s["image_grid_hw"] is not None])
        vae = [image for s in samples for image in s["vae_pixel_values"]]
        if vae:
            out["vae_pixel_values"] = vae
            out["latent_noised"] = torch.tensor([flag for s in samples for flag in s["latent_noised"]], dtype=torch.bool)
            if all("noise_seed" in s for s in samples):
                out["noise_seeds"] = [s["noise_seed"] for s in samples]
                out["vae_images_per_sample"] = [len(s["vae_pixel_values"]) for s in samples]
        return out


__all__ = [
    "CFGDropout",
    "PlanItem",
    "SequenceBuilder",
    "UniMedVLDataCollator",
    "UniMedVLIterableTrainingDataset",
    "UniMedVLTrainingDataset",
    "built_dataset",
    "sequence_plan",
]
