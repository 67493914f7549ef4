"""UniMedVL's three-stage curriculum: stage configs, data mixtures and one `run_stage` built on `UniMedVLTrainer`.

A stage config (`configs/stage{1,2,3}.yaml`) holds the data-group mixture (`understanding`, `text_to_image`,
`interleaved`), the freezing flags, CFG dropout, `max_tokens_per_sample`, `pack_tokens` (tokens per packed row; null
= one sample per row) and the `training` arguments
(`UniMedVLTrainingArguments` fields). A user config adds the data sources and overrides:

```yaml
data:
  understanding: [{jsonl: vqa.jsonl, image_dir: images/}]        # task inferred per row, or `task: understanding`
  text_to_image: [{jsonl: captions.jsonl, image_dir: images/}]
  interleaved:   [{jsonl: edits.jsonl, image_dir: images/, task: image_to_image}]
image_transforms:                       # optional (max long side, min short side, stride, max pixels)
  understanding: [980, 378, 14, 2007040]
  generation_vit: [980, 387, 14, 1806336]
  generation_vae: [1024, 32, 16, 1806336]
training: {save_steps: 500}              # overrides for every stage
stages: {1: {training: {max_steps: 1000}}}   # overrides for one stage
```

`run_curriculum` runs stages in order, each from the previous stage's `final/` folder. A stage whose `final/` folder
exists is skipped; an interrupted stage resumes from its last complete `checkpoint-N`.
"""

import copy
import json
import logging
import os
import shutil
from importlib.util import find_spec

import datasets
import torch
import yaml
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from .data import DataReport, ImageLimits, load_jsonl_records, validate_records
from .freezing import apply_freezing
from .lora import add_lora, load_quantized_model, lora_config
from .sequences import CFGDropout, SequenceBuilder, UniMedVLDataCollator, UniMedVLTrainingDataset
from .trainer import UniMedVLTrainer, UniMedVLTrainingArguments


logger = logging.getLogger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
STAGES = (1, 2, 3)
DATA_GROUPS = ("understanding", "text_to_image", "interleaved")
FINAL_DIR = "final"


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_stage_config(stage: int, user_config: dict | str | None = None) -> dict:
    """The shipped config of `stage` merged with a user config (dict or YAML path): top-level keys, then `stages[N]`."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}.")
    with open(os.path.join(CONFIG_DIR, f"stage{stage}.yaml")) as handle:
        config = yaml.safe_load(handle)
    if isinstance(user_config, str):
        with open(user_config) as handle:
            user_config = yaml.safe_load(handle) or {}
    user_config = dict(user_config or {})
    per_stage = user_config.pop("stages", {}) or {}
    config = _merge(config, user_config)
    return _merge(config, per_stage.get(stage, per_stage.get(str(stage), {})))


def training_processor(processor, transforms: dict | None):
    """A copy of `processor` whose image processor uses the training resolutions in `transforms` (if given)."""
    if not transforms:
        return processor
    processor = copy.deepcopy(processor)
    image_processor = processor.image_processor
    for key, attribute in (
        ("understanding", "understanding_transform"),
        ("generation_vit", "generation_vit_transform"),
        ("generation_vae", "generation_vae_transform"),
    ):
        if key in transforms:
            setattr(image_processor, attribute, tuple(transforms[key]))
    return processor


def load_group(sources: list, builder: SequenceBuilder, config: dict, report: DataReport) -> datasets.Dataset | None:
    """Loads and validates every source of one data group (JSONL files or ready `datasets.Dataset`s)."""
    parts = []
    for source in sources:
        if isinstance(source, datasets.Dataset):
            parts.append(source)
        else:
            parts.append(load_jsonl_records(source["jsonl"], source.get("image_dir"), source.get("task"), report))
    if not parts:
        return None
    records = datasets.concatenate_datasets(parts)
    limits = ImageLimits(**config.get("image_limits", {}))
    records, _ = validate_records(records, limits, builder.num_tokens, config.get("max_tokens_per_sample"), report)
    return records


def build_mixture(config: dict, builder: SequenceBuilder) -> tuple[datasets.Dataset, dict[str, DataReport]]:
    """Interleaves the stage's data groups with its mixture weights (normalised over the groups that have data)."""
    weights = {group: float(w) for group, w in (config.get("mixture") or {}).items() if float(w) > 0}
    unknown = sorted(set(weights) - set(DATA_GROUPS))
    if unknown:
        raise ValueError(f"Unknown data group(s) {unknown} in the mixture; use {DATA_GROUPS}.")
    data = config.get("data") or {}
    groups, reports = {}, {}
    for group in weights:
        reports[group] = DataReport()
        records = load_group(data.get(group) or [], builder, config, reports[group])
        if records is None:
            logger.warning("Stage %s: no data for group %r (weight %.2f); it is left out.", config.get("stage"), group, weights[group])
            continue
        groups[group] = records
    if not groups:
        raise ValueError(f"Stage {config.get('stage')}: none of the groups {sorted(weights)} has data; add them under `data:`.")
    total = sum(weights[g] for g in groups)
    seed = config.get("training", {}).get("seed", 42)
    names = list(groups)
    mixture = datasets.interleave_datasets(
        [groups[g] for g in names],
        probabilities=[weights[g] / total for g in names],
        seed=seed,
        stopping_strategy="all_exhausted",
    )
    return mixture, reports


def _report_to() -> list[str]:
    if find_spec("tensorboard") is not None or find_spec("tensorboardX") is not None:
        return ["tensorboard"]
    logger.warning("TensorBoard is not installed (pip install tensorboard): logging to the console and trainer_state.json only.")
    return []


def run_stage(
    config: dict,
    model_path: str,
    output_dir: str,
    use_cpu: bool = False,
    bf16: bool = False,
    lora: list[str] | None = None,
    lora_rank: int = 16,
    qlora: bool = False,
    resume: bool = True,
    callbacks: list | None = None,
) -> str:
    """Runs one stage from `model_path` into `output_dir`; returns the `final/` folder (model, processor, EMA, reports).

    With `lora` (preset names) only adapters are trained (`qlora=True`: on 4-bit NF4 base weights); `final/` then
    holds the adapter in `final/adapter` and the merged model (not possible for QLoRA, whose base stays 4-bit).
    """
    from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor

    final_dir = os.path.join(output_dir, FINAL_DIR)
    if os.path.isdir(final_dir):
        logger.warning("Stage %s already finished (%s exists): skipped.", config.get("stage"), final_dir)
        return final_dir
    training = dict(config.get("training") or {})
    set_seed(training.get("seed", 42))
    processor = UniMedVLProcessor.from_pretrained(model_path)
    builder = SequenceBuilder(training_processor(processor, config.get("image_transforms")), CFGDropout(**config.get("cfg_dropout", {})))
    mixture, reports = build_mixture(config, builder)

    if qlora:
        if not lora:
            raise ValueError("qlora=True needs LoRA presets (lora=[...]).")
        model = load_quantized_model(model_path)
    else:
        model = UniMedVLForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32)
    if lora:
        model = add_lora(model, lora_config(lora, r=lora_rank))
    else:
        freeze = config.get("freeze", {})
        apply_freezing(model, **{f"freeze_{part}": bool(on) for part, on in freeze.items()})

    args = UniMedVLTrainingArguments(
        output_dir=output_dir,
        use_cpu=use_cpu,
        bf16=bf16,
        remove_unused_columns=False,
        save_strategy="steps",
        report_to=_report_to(),
        ddp_find_unused_parameters=True,
        **training,
    )
    dataset = UniMedVLTrainingDataset(mixture, builder, seed=args.seed)
    trainer = UniMedVLTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=UniMedVLDataCollator(processor.tokenizer.pad_token_id or 0, pack_tokens=config.get("pack_tokens")),
        callbacks=callbacks,
    )
    checkpoint = get_last_checkpoint(output_dir) if resume and os.path.isdir(output_dir) else None
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.is_world_process_zero():
        _save_final(trainer, processor, final_dir, reports, lora, qlora, dataset, model_path)
    trainer.accelerator.wait_for_everyone()
    return final_dir


def _save_final(trainer, processor, final_dir, reports, lora, qlora, dataset, model_path) -> None:
    """Writes `final/` atomically (via `final.tmp`)."""
    staging = final_dir + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if lora:
        model.save_pretrained(os.path.join(staging, "adapter"))
        if not qlora:
            model.merge_and_unload().save_pretrained(staging)
    else:
        model.save_pretrained(staging)
        if trainer.ema is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in trainer.ema_state_dict().items()}, os.path.join(staging, "ema.safetensors"))
    processor.save_pretrained(staging)
    summary = {
        "base_model": os.path.abspath(model_path),
        "data": {group: report.to_dict() for group, report in reports.items()},
        "runtime_failures": dataset.runtime_failures,
        "log_history": trainer.state.log_history,
    }
    with open(os.path.join(staging, "training_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    os.replace(staging, final_dir)


def run_curriculum(
    stages: list[int], user_config: dict | str | None, model_path: str, output_dir: str, **kwargs
) -> list[str]:
    """Runs `stages` in order into `output_dir/stage{N}`, each starting from the previous stage's `final/` folder."""
    if kwargs.get("qlora") and len(stages) > 1:
        raise ValueError("QLoRA stages cannot be chained (their 4-bit base cannot be merged); run one stage at a time.")
    finals = []
    for stage in stages:
        config = load_stage_config(stage, user_config)
        final = run_stage(config, model_path, os.path.join(output_dir, f"stage{stage}"), **kwargs)
        finals.append(final)
        model_path = final
    return finals


__all__ = [
    "CONFIG_DIR",
    "DATA_GROUPS",
    "STAGES",
    "build_mixture",
    "load_stage_config",
    "run_curriculum",
    "run_stage",
    "training_processor",
]
