"""GRPO fine-tuning of UniMedVL's understanding expert with verifiable medical rewards (`trl.GRPOTrainer` + LoRA).

    unimedvl-train grpo --data ../shared/data --output runs/grpo [--model PATH] [--max_steps 200] [--evaluate]
    unimedvl-train grpo --config grpo.yaml          # TrlParser: the recipe's fields and any trl.GRPOConfig field

The recipe (`run_grpo`): questions with one image each, as TRL conversational prompts (`prompt`, `image`, `answer`,
`answer_type`, `question_type`; `medical_grpo_dataset` builds them from VQA-RAD train and the MedPix train labels:
modality, body region, plane); `num_generations` sampled answers per question; rewards from `rewards.py` (exact match
of closed answers, token F1 of open answers, optional format reward), scored like the evaluation harness; LoRA on the
understanding expert (`lora_preset="und"`); the result is the adapter (`final/adapter`) and the merged model
(`final/`), loadable with `from_pretrained`. With `evaluate=True` the harness (`unimedvl_pipelines.evaluation`) scores
the model before and after on held-out VQA-RAD test and MedPix dev questions (`grpo_summary.json`).

`UniMedVLGRPOTrainer` adapts TRL's VLM plumbing to UniMedVL's processor outputs: image patches `pixel_values`
`[num_patches, 3·p·p]` with `image_grid_hw` `[num_images, 2]` are split per sample by patch count, and prompts come
back from the processor without padding.
"""

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer, TrlParser

from modeling_unimedvl.atomic_files import staged_folder

from .lora import lora_config
from .rewards import MEDICAL_REWARDS


logger = logging.getLogger(__name__)


class UniMedVLGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` for UniMedVL (TRL 1.16).

    TRL's VLM plumbing splits, shuffles and chunks image patches by an `image_grid_thw` `[num_images, 3]` field
    (patches per image = its product). UniMedVL's processor returns `image_grid_hw` `[num_images, 2]`, which TRL
    would drop; the trainer carries it as `image_grid_thw = [1, h, w]` and gives the model `image_grid_hw` again.
    Prompts come back from the processor unpadded.
    """

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, fields = super()._tokenize_prompts(prompts)
        mask = fields.pop("attention_mask", None)
        if isinstance(prompt_ids, torch.Tensor):
            if mask is None:
                mask = prompt_ids != self._tokenizer.pad_token_id
            prompt_ids = [row[keep.bool()].tolist() for row, keep in zip(prompt_ids, mask)]
        return prompt_ids, images, fields

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if "pixel_values" in output and "image_grid_thw" not in output:
            images = [image for example in inputs for image in (example.get("images") or [example.get("image")]) if image is not None]
            grid_hw = self.processing_class.image_processor(images, mode="understanding")["image_grid_hw"]
            output["image_grid_thw"] = torch.cat([torch.ones_like(grid_hw[:, :1]), grid_hw], dim=-1).to(output["pixel_values"].device)
        return output

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, pixel_values=None,
                                           image_grid_thw=None, num_images=None, **kwargs):
        if image_grid_thw is None or pixel_values is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                pixel_values=pixel_values, num_images=num_images, **kwargs,
            )
        batch_size = batch_size or input_ids.size(0)
        image_bounds = [0, *torch.tensor(num_images).cumsum(0).tolist()]
        patch_bounds = [0, *image_grid_thw.prod(-1).cumsum(0).tolist()]
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            first, last = image_bounds[start], image_bounds[end]
            ids, mask = input_ids[start:end], attention_mask[start:end]
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100  # only the completion tokens are scored
            with self.accelerator.autocast():
                outputs = model(
                    input_ids=ids,
                    attention_mask=mask,
                    pixel_values=pixel_values[patch_bounds[first] : patch_bounds[last]],
                    image_grid_hw=image_grid_thw[first:last, 1:],
                    labels=labels,
                    fused_lm_head=True,
                )
            logps.append(outputs.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(outputs.entropy[:, -logits_to_keep:])
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def question_row(image: str, question: str, answer: str, answer_type: str, question_type: str) -> dict:
    """One GRPO example: a TRL conversational prompt with one image part, the reference answer and its type."""
    return {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        "image": image,
        "answer": answer,
        "answer_type": answer_type,
        "question_type": question_type,
    }


def medical_grpo_dataset(data_dir: str, limit: int | None = None, seed: int = 0):
    """VQA-RAD train questions and the MedPix train label questions (modality, body region, plane; closed) as a
    shuffled `datasets.Dataset` of `question_row`s (images decoded on access)."""
    import datasets

    from .build_unimedvl_tiny import medpix_questions, medpix_rows
    from .evaluate_unimedvl_tiny import QUESTION_TYPES

    with open(os.path.join(data_dir, "vqa_rad", "trainset.json")) as handle:
        vqa = json.load(handle)
    rows = [
        question_row(
            os.path.join(data_dir, "vqa_rad", "images", r["image_name"]), r["question"], str(r["answer"]),
            r["answer_type"].strip().upper(), str(r.get("question_type", "")).strip().lower() or "vqa_rad",
        )
        for r in vqa
    ]
    for row in medpix_rows(data_dir, "train"):
        image = os.path.join(data_dir, "medpix", "images", f"{row['image']}.png")
        rows += [question_row(image, q, a, "CLOSED", QUESTION_TYPES[q]) for q, a in medpix_questions(row)]
    dataset = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).shuffle(seed=seed)
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


# ----------------------------------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class GRPORecipeArguments:
    """What to train and on what (the `trl.GRPOConfig` fields set the optimisation)."""

    model: str | None = field(default=None, metadata={"help": "UniMedVL folder (default: the shipped UniMedVL-Tiny)."})
    data: str = field(default="../shared/data", metadata={"help": "Folder with vqa_rad/ and medpix/."})
    rewards: str = field(default="closed,open,format", metadata={"help": "Comma-separated rewards: closed, open, format."})
    reward_weights_by_name: str = field(default="closed=1,open=1,format=0.2", metadata={"help": "name=weight pairs."})
    lora_preset: str = field(default="und", metadata={"help": "LoRA presets (lora.LORA_PRESETS), comma-separated."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N (shuffled) training questions."})
    evaluate: bool = field(default=False, metadata={"help": "Score held-out VQA-RAD test and MedPix dev before and after."})
    eval_limit: int | None = field(default=None, metadata={"help": "Held-out questions per set (None: all)."})


def default_grpo_config(output_dir: str, **overrides) -> GRPOConfig:
    """GRPO settings that fit UniMedVL-Tiny on a CPU: 4 answers per question, 8-token answers, LoRA learning rate."""
    settings = dict(
        output_dir=output_dir,
        num_generations=4,
        per_device_train_batch_size=16,
        max_completion_length=8,
        temperature=1.0,
        learning_rate=2e-4,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=10,
        max_steps=200,
        beta=0.0,
        logging_steps=5,
        save_steps=50,
        save_total_limit=1,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def _reward_setup(recipe: GRPORecipeArguments) -> tuple[list, list[float]]:
    names = [name.strip() for name in recipe.rewards.split(",") if name.strip()]
    unknown = [name for name in names if name not in MEDICAL_REWARDS]
    if unknown or not names:
        raise ValueError(f"Unknown reward(s) {unknown or names}; choose from {sorted(MEDICAL_REWARDS)}.")
    weights = dict(pair.split("=") for pair in recipe.reward_weights_by_name.split(",") if pair.strip())
    return [MEDICAL_REWARDS[name] for name in names], [float(weights.get(name, 1.0)) for name in names]


def evaluate_heldout(model, processor, model_dir: str, data_dir: str, output_dir: str, limit: int | None = None) -> dict:
    """Closed accuracy / open recall on VQA-RAD test and accuracy per MedPix dev question type, with the training
    splits' majority baselines (the evaluation harness, via `evaluate_unimedvl_tiny`)."""
    from .evaluate_unimedvl_tiny import medpix_dev_questions, vqa_rad

    model.eval()
    start = time.perf_counter()
    vqa = vqa_rad(model, processor, model_dir, data_dir, output_dir, seed=0, batch_size=32, limit=limit)
    medpix = medpix_dev_questions(model, processor, model_dir, data_dir, output_dir, seed=0, batch_size=32, limit=limit)
    return {"vqa_rad": vqa, "medpix_dev": medpix, "seconds": round(time.perf_counter() - start, 1)}


def run_grpo(recipe: GRPORecipeArguments, config: GRPOConfig, callbacks: list | None = None) -> dict:
    """Runs the GRPO recipe into `config.output_dir`; returns the summary (also written to `grpo_summary.json`).

    `final/` holds the merged model (processor included) and `final/adapter` the LoRA adapter; both written atomically.
    """
    from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor
    from modeling_unimedvl.default_model import DEFAULT_MODEL_DIR

    model_dir = recipe.model or DEFAULT_MODEL_DIR
    output_dir = config.output_dir
    os.makedirs(output_dir, exist_ok=True)
    reward_funcs, weights = _reward_setup(recipe)
    config.reward_weights = weights
    processor = UniMedVLProcessor.from_pretrained(model_dir)
    model = UniMedVLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    summary = {"model": os.path.abspath(model_dir), "rewards": recipe.rewards, "reward_weights": weights}
    if recipe.evaluate:
        summary["before"] = evaluate_heldout(model, processor, model_dir, recipe.data, os.path.join(output_dir, "eval_before"), recipe.eval_limit)
    dataset = medical_grpo_dataset(recipe.data, recipe.limit, config.seed)
    summary["train_questions"] = len(dataset)
    trainer = UniMedVLGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora_config(recipe.lora_preset.split(","), r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank),
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.train()
    summary["train_seconds"] = round(time.perf_counter() - start, 1)
    summary["log_history"] = trainer.state.log_history
    final_dir = os.path.join(output_dir, "final")
    merged = None
    if trainer.args.should_save:
        with staged_folder(final_dir, overwrite=True) as staging:
            trainer.model.save_pretrained(os.path.join(staging, "adapter"))
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(staging)
            processor.save_pretrained(staging)
    summary["final"] = final_dir
    if recipe.evaluate and merged is not None:
        summary["after"] = evaluate_heldout(merged, processor, final_dir, recipe.data, os.path.join(output_dir, "eval_after"), recipe.eval_limit)
    with open(os.path.join(output_dir, "grpo_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1, default=str)
    return summary


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = default_grpo_config("runs/grpo")
    parser = TrlParser((GRPORecipeArguments, GRPOConfig))
    parser.set_defaults(**{f: getattr(defaults, f) for f in (
        "num_generations", "per_device_train_batch_size", "max_completion_length", "learning_rate", "lr_scheduler_type",
        "warmup_steps", "max_steps", "beta", "logging_steps", "save_steps", "save_total_limit", "bf16",
        "activation_checkpointing", "report_to", "disable_tqdm", "seed")})
    if "--output_dir" not in argv and not any(a.startswith("--output_dir=") for a in argv):
        argv += ["--output_dir", "runs/grpo"]
    try:
        recipe, config = parser.parse_args_and_config(argv)
        if config.max_steps is not None and config.max_steps <= 0:
            raise ValueError(f"--max_steps must be a positive number of optimizer steps, got {config.max_steps}")
        if not os.path.isdir(os.path.join(recipe.data, "vqa_rad")):
            raise ValueError(f"--data {recipe.data} has no vqa_rad/ folder")
        summary = run_grpo(recipe, config)
    except (ValueError, FileNotFoundError) as error:
        print(f"unimedvl-train grpo: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "log_history"}, indent=1, default=str))
    return 0


__all__ = [
    "GRPORecipeArguments",
    "UniMedVLGRPOTrainer",
    "default_grpo_config",
    "evaluate_heldout",
    "main",
    "medical_grpo_dataset",
    "question_row",
    "run_grpo",
]
