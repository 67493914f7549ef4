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
import dataclasses
import json
import logging
import os
import shutil
from importlib.util import find_spec

import datasets
import torch
import yaml
from safetensors.torch import save_file
from transformers import set_seed

from modeling_unimedvl.atomic_files import staged_folder

from .checkpoints import checkpoint_step, last_committed_checkpoint, remove_uncommitted
from .data import DataReport, ImageLimits, load_jsonl_records, validate_records
from .freezing import apply_freezing
from .lora import load_quantized_model, lora_config, prepare_model_for_kbit_training
from .sequences import CFGDropout, SequenceBuilder, UniMedVLTrainingDataset
from .trainer import UniMedVLTrainer, UniMedVLTrainingArguments, unimedvl_module


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


def stage_arguments(config: dict, output_dir: str, use_cpu: bool = False, bf16: bool = False) -> UniMedVLTrainingArguments:
    """The stage's `UniMedVLTrainingArguments`: its `training` section, CFG dropout, packing and length limit; an
    unknown or ill-typed key is one clear `ValueError`."""
    training = dict(config.get("training") or {})
    cfg = config.get("cfg_dropout") or {}
    unknown_cfg = sorted(set(cfg) - {"text", "vit", "vae"})
    if unknown_cfg:
        raise ValueError(f"Stage {config.get('stage')}: unknown cfg_dropout key(s) {unknown_cfg}; use text, vit, vae.")
    known = {f.name for f in dataclasses.fields(UniMedVLTrainingArguments)}
    unknown = sorted(set(training) - known)
    if unknown:
        raise ValueError(f"Stage {config.get('stage')}: unknown training argument(s) {unknown} (see UniMedVLTrainingArguments / trl.SFTConfig).")
    max_steps = training.get("max_steps", -1)
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps <= 0:
        raise ValueError(f"Stage {config.get('stage')}: max_steps must be a positive number of optimizer steps, got {max_steps!r}.")
    try:
        return UniMedVLTrainingArguments(
            output_dir=output_dir,
            use_cpu=use_cpu,
            bf16=bf16,
            save_strategy="steps",
            report_to=_report_to(),
            ddp_find_unused_parameters=True,
            cfg_dropout_text=float(cfg.get("text", 0.0)),
            cfg_dropout_vit=float(cfg.get("vit", 0.0)),
            cfg_dropout_vae=float(cfg.get("vae", 0.0)),
            pack_tokens=config.get("pack_tokens"),
            max_tokens_per_sample=config.get("max_tokens_per_sample"),
            **training,
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"Stage {config.get('stage')}: invalid training configuration: {error}") from None


def load_training_model(model_path: str):
    """The model at `model_path` in float32 for training. Under FSDP with `fsdp_cpu_ram_efficient_loading` (what
    accelerate's FSDP launch and `cpu_fsdp` set), only global rank 0 reads the weights: every other process builds the
    architecture without initialising it (parameters on uninitialised storage, which accelerate moves to the meta
    device before sharding; buffers computed, since accelerate keeps the non-persistent ones) and receives its shards
    from rank 0 when accelerate prepares the model."""
    from accelerate import init_empty_weights
    from transformers.integrations import is_fsdp_enabled

    from modeling_unimedvl import UniMedVLConfig, UniMedVLForConditionalGeneration

    rank = int(os.environ.get("RANK", "0"))
    if not is_fsdp_enabled() or rank == 0:
        return UniMedVLForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32)
    with init_empty_weights(include_buffers=False):
        model = UniMedVLForConditionalGeneration._from_config(UniMedVLConfig.from_pretrained(model_path), dtype=torch.float32)
    count = _allocate_uninitialised_parameters(model)
    logger.info("Process %d: no weights read; %d parameter tensors left uninitialised, their shards come from rank 0.", rank, count)
    return model


def _allocate_uninitialised_parameters(model: torch.nn.Module) -> int:
    """Gives every meta-device parameter of `model` uninitialised CPU storage of its shape (tied parameters stay tied;
    accelerate tells parameters apart by their storage when it swaps in the sharded ones); returns how many."""
    allocated: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None or not parameter.is_meta:
                continue
            if id(parameter) not in allocated:
                storage = torch.empty(parameter.shape, dtype=parameter.dtype, device="cpu")
                allocated[id(parameter)] = torch.nn.Parameter(storage, requires_grad=parameter.requires_grad)
            setattr(module, name, allocated[id(parameter)])
    return len(allocated)


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
    peft_config=None,
) -> str:
    """Runs one stage from `model_path` into `output_dir`; returns the `final/` folder (model, processor, EMA, reports).

    With `lora` (preset names) or a `peft_config` only adapters are trained (`qlora=True`: on 4-bit NF4 base
    weights); `final/` then holds the adapter in `final/adapter` and the merged model (not possible for QLoRA, whose
    base stays 4-bit). A stage resumed from a checkpoint at its last step writes `final/` without training further,
    so `final/` equals that of an uninterrupted run.
    """
    from modeling_unimedvl import UniMedVLProcessor

    final_dir = os.path.join(output_dir, FINAL_DIR)
    if os.path.isdir(final_dir):
        logger.warning("Stage %s already finished (%s exists): skipped.", config.get("stage"), final_dir)
        return final_dir
    args = stage_arguments(config, output_dir, use_cpu, bf16)
    set_seed(args.seed)
    processor = UniMedVLProcessor.from_pretrained(model_path)
    builder = SequenceBuilder(
        training_processor(processor, config.get("image_transforms")),
        CFGDropout(args.cfg_dropout_text, args.cfg_dropout_vit, args.cfg_dropout_vae),
    )
    mixture, reports = build_mixture(config, builder)

    if qlora:
        if not (lora or peft_config):
            raise ValueError("qlora=True needs LoRA presets (lora=[...]) or a peft_config.")
        model = prepare_model_for_kbit_training(load_quantized_model(model_path), use_gradient_checkpointing=False)
    else:
        model = load_training_model(model_path)
    if lora and peft_config is None:
        peft_config = lora_config(lora, r=lora_rank)
    if peft_config is None:
        freeze = config.get("freeze", {})
        apply_freezing(model, **{f"freeze_{part}": bool(on) for part, on in freeze.items()})

    trainer = UniMedVLTrainer(
        model=model,
        args=args,
        train_dataset=UniMedVLTrainingDataset(mixture, builder, seed=args.seed),
        processing_class=processor,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    if resume and trainer.args.should_save:
        remove_uncommitted(output_dir)
    trainer.accelerator.wait_for_everyone()
    checkpoint = last_committed_checkpoint(output_dir) if resume else None
    if checkpoint is not None and checkpoint_step(checkpoint) >= args.max_steps:
        finish_from_checkpoint(trainer, checkpoint)
    else:
        trainer.train(resume_from_checkpoint=checkpoint)
    write_final(trainer, processor, final_dir, reports, peft_config is not None, qlora, model_path)
    return final_dir


def finish_from_checkpoint(trainer: UniMedVLTrainer, checkpoint: str) -> None:
    """Loads the weights (and EMA) of a checkpoint taken at the stage's last step instead of training past it."""
    from safetensors.torch import load_file

    logger.warning("Stage reached max_steps in %s: writing final/ from it without further training.", checkpoint)
    state = load_file(os.path.join(checkpoint, "model.safetensors")) if os.path.isfile(os.path.join(checkpoint, "model.safetensors")) else None
    if state is None:
        raise ValueError(f"{checkpoint} holds no model.safetensors to finish the stage from; resume it with the launcher that wrote it.")
    model = trainer.model
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        adapter = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
        set_peft_model_state_dict(model, adapter)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [key for key in missing if key in dict(model.named_parameters())]:
            raise ValueError(f"{checkpoint}/model.safetensors does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    trainer._resume_checkpoint = checkpoint
    trainer.state.global_step = checkpoint_step(checkpoint)
    with open(os.path.join(checkpoint, "trainer_state.json")) as handle:
        trainer.state.log_history = json.load(handle).get("log_history", [])
    trainer.start_ema()


def unsharded_copy(model):
    """A `UniMedVLForConditionalGeneration` with `model`'s config and generation config on the meta device, to save a
    gathered state dict through `save_pretrained` (an FSDP2-sharded model's class is a generated subclass whose
    module files must not be copied as model code)."""
    from modeling_unimedvl import UniMedVLForConditionalGeneration

    source = unimedvl_module(model)
    with torch.device("meta"):
        copy_ = UniMedVLForConditionalGeneration(source.config)
    copy_.generation_config = source.generation_config
    return copy_


def write_final(trainer: UniMedVLTrainer, processor, final_dir: str, reports: dict, adapter: bool, qlora: bool, model_path: str) -> None:
    """Writes `final/` atomically (`staged_folder`: a staging folder swapped in when complete). Under FSDP every
    process takes part in gathering the weights and the main process writes."""
    ema_state = trainer.ema_state_dict() if trainer.ema is not None and not adapter else None
    full_state = trainer.full_state_dict() if not adapter else None
    if trainer.args.should_save:
        with staged_folder(final_dir, overwrite=True) as staging:
            if adapter:
                peft_model = trainer.accelerator.unwrap_model(trainer.model)
                peft_model.save_pretrained(os.path.join(staging, "adapter"))
                if not qlora:
                    peft_model.merge_and_unload().save_pretrained(staging)
            else:
                unsharded_copy(trainer.model).save_pretrained(staging, state_dict=full_state)
                if ema_state is not None:
                    save_file({k: v.contiguous() for k, v in ema_state.items()}, os.path.join(staging, "ema.safetensors"))
            processor.save_pretrained(staging)
            summary = {
                "base_model": os.path.abspath(model_path),
                "data": {group: report.to_dict() for group, report in reports.items()},
                "runtime_failures": getattr(trainer.train_dataset, "runtime_failures", 0),
                "log_history": trainer.state.log_history,
            }
            with open(os.path.join(staging, "training_summary.json"), "w") as handle:
                json.dump(summary, handle, indent=1)
    trainer.accelerator.wait_for_everyone()


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
    "load_training_model",
    "finish_from_checkpoint",
    "run_curriculum",
    "run_stage",
    "stage_arguments",
    "training_processor",
    "unsharded_copy",
    "write_final",
]
