"""`UniMedVLTrainer`: a TRL `SFTTrainer` with UniMedVL's CE + flow-matching loss, EMA and committed checkpoints.

The trainer is built on `trl.SFTTrainer` / `trl.SFTConfig`, so `peft_config`, `TrlParser` YAML / command-line
configuration, the logging integrations (`report_to`) and model-card tags work as for any TRL trainer. Its data are
UniMedVL training records (`data.RECORD_FEATURES`, or any layout `data.records_from_dataset` reads: UniMedVL / LLaVA
JSONL rows, Hugging Face chat `messages` with image content parts, `image` / `images` columns, streaming datasets),
turned into mixed understanding / generation sequences by `sequences.SequenceBuilder`.

The training forward is the model's normal forward (the inference code path): the model VAE-encodes the batch's
images, noises the targets to one logit-normal timestep per target image (`x_t = (1 − t)·x_0 + t·ε`; conditioning
images keep t = 0) and predicts the velocity. The loss is `ce_weight · CE + mse_weight · MSE` with CE the mean
next-token cross-entropy over answer tokens and MSE the mean over noised latent tokens of the per-token mean over 64
channels of `(velocity − (ε − x_0))²`. Both are means over one micro-batch (the model sets
`accepts_loss_kwargs = False`), so the Trainer divides by the accumulation steps. Samples built by
`UniMedVLTrainingDataset` carry a noise seed, so each sample's timestep and noise are the same whatever the number of
processes or the batch it lands in (a sharded run reproduces a single-process run).
"""

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field

import datasets
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer

from .checkpoints import COMMIT_NAME, committed_checkpoints, commit_checkpoint, last_committed_checkpoint, remove_uncommitted
from .flow_matching import flow_matching_mse, sample_timesteps


logger = logging.getLogger(__name__)

EMA_WEIGHTS_NAME = "ema.safetensors"
EMA_STATE_NAME = "ema_state.json"


@dataclass
class UniMedVLTrainingArguments(SFTConfig):
    """`trl.SFTConfig` plus UniMedVL's loss, EMA and batching settings.

    Defaults differ from `SFTConfig` where UniMedVL needs it: full precision and no activation checkpointing unless
    asked for (`bf16`, `gradient_checkpointing`), no sequence truncation (`max_length=None`: image blocks must stay
    whole), the dataset columns kept for the UniMedVL collator.
    """

    ce_weight: float = field(default=0.25, metadata={"help": "Weight of the cross-entropy on answer tokens."})
    mse_weight: float = field(default=1.0, metadata={"help": "Weight of the flow-matching MSE on noised latents."})
    timestep_shift: float = field(default=1.0, metadata={"help": "Shift s of t' = s·t / (1 + (s − 1)·t)."})
    vae_sample: bool = field(default=True, metadata={"help": "Encode images by sampling the VAE posterior (original) instead of its mean."})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA decay of the trainable weights (0 = no EMA)."})
    pack_tokens: int | None = field(default=None, metadata={"help": "Pack the samples of a batch into rows of at most N tokens (None: one sample per row)."})
    cfg_dropout_text: float = field(default=0.0, metadata={"help": "Probability of dropping a generation prompt (classifier-free guidance)."})
    cfg_dropout_vit: float = field(default=0.0, metadata={"help": "Probability of dropping a conditioning ViT image."})
    cfg_dropout_vae: float = field(default=0.0, metadata={"help": "Probability of dropping a conditioning VAE image."})
    max_tokens_per_sample: int | None = field(default=None, metadata={"help": "Drop rows whose sequence is longer (validation)."})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Activation checkpointing of the decoder layers (default off)."})
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision."})
    max_length: int | None = field(default=None, metadata={"help": "Unused: UniMedVL sequences are never truncated."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the record columns for the collator."})
    dataset_kwargs: dict | str | None = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "UniMedVL builds its sequences itself; TRL's tokenisation is skipped."},
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("ce_weight", "mse_weight", "cfg_dropout_text", "cfg_dropout_vit", "cfg_dropout_vae", "ema_decay"):
            value = getattr(self, name)
            if not 0 <= value < float("inf") or (name.startswith(("cfg", "ema")) and value >= 1):
                raise ValueError(f"{name} must be finite and in [0, {'1' if name.startswith(('cfg', 'ema')) else 'inf'}), got {value}.")
        if not self.timestep_shift > 0 or self.timestep_shift == float("inf"):
            raise ValueError(f"timestep_shift must be a finite positive number, got {self.timestep_shift}.")
        if self.pack_tokens is not None and self.pack_tokens <= 0:
            raise ValueError(f"pack_tokens must be a positive number of tokens, got {self.pack_tokens}.")


def unimedvl_module(model: torch.nn.Module) -> torch.nn.Module:
    """The `UniMedVLForConditionalGeneration` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly FSDP2-sharded `DTensor`) tensor, detached on the CPU; collective for DTensors."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


class _TrainerHooks(TrainerCallback):
    """EMA creation (after the model is wrapped / sharded), EMA updates and checkpoint commits, through public hooks."""

    def __init__(self, trainer: "UniMedVLTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.share_position_tables()
        self.trainer.reduce_unused_expert_gradients()
        self.trainer.start_ema()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.zero_unused_gradients()

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.ema is not None:
            self.trainer.ema.step(self.trainer.ema_parameters())

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.trainer.ema is not None:
            self.trainer.save_ema(folder)
        self.trainer.accelerator.wait_for_everyone()
        if args.should_save:
            commit_checkpoint(folder, state.global_step)
        self.trainer.accelerator.wait_for_everyone()


class UniMedVLTrainer(SFTTrainer):
    """`trl.SFTTrainer` for UniMedVL's mixed understanding / generation batches; logs `ce`, `mse` and
    `tokens_per_second`.

    Args:
        model: a `UniMedVLForConditionalGeneration` (or a PEFT model around one), or a path.
        args ([`UniMedVLTrainingArguments`]).
        train_dataset: a `UniMedVLTrainingDataset` / `UniMedVLIterableTrainingDataset`, or records as a `datasets.Dataset` / `datasets.IterableDataset` in
            any layout that `data.records_from_dataset` reads (built with `args.cfg_dropout_*`).
        processing_class: the `UniMedVLProcessor` (default: loaded from the model's folder).
        data_collator: default `UniMedVLDataCollator(pad id, args.pack_tokens)`.
        peft_config: a `peft.LoraConfig` (e.g. `lora.lora_config("und")`), applied by TRL.

    A checkpoint `checkpoint-N` counts only once its commit file (`checkpoint_complete.json`) is written, after
    every file of it (model or sharded model, optimizer, RNG states, trainer state, EMA) is on disk; resuming
    (`train(resume_from_checkpoint=True)`) takes the last committed checkpoint and removes uncommitted ones, so a run
    killed while saving never resumes from a half-written checkpoint. With `args.ema_decay > 0` an EMA of the
    trainable weights (diffusers `EMAModel`, sharded like the model under FSDP) is kept and checkpointed.
    """

    _tag_names = ["trl", "sft", "unimedvl"]
    _name = "UniMedVL"

    def __init__(self, model, args=None, train_dataset=None, processing_class=None, data_collator=None, **kwargs):
        from .sequences import (
            CFGDropout,
            SequenceBuilder,
            UniMedVLDataCollator,
            UniMedVLIterableTrainingDataset,
            UniMedVLTrainingDataset,
            built_dataset,
        )

        if not isinstance(args, UniMedVLTrainingArguments):
            raise TypeError("UniMedVLTrainer needs UniMedVLTrainingArguments (ce_weight, mse_weight, timestep_shift, ...).")
        if train_dataset is None:
            raise ValueError("UniMedVLTrainer needs a train_dataset (UniMedVL records or a UniMedVLTrainingDataset).")
        built = train_dataset if isinstance(train_dataset, (UniMedVLTrainingDataset, UniMedVLIterableTrainingDataset)) else None
        records = built.records if built is not None else train_dataset
        if not isinstance(records, (datasets.Dataset, datasets.IterableDataset)):
            raise TypeError(f"train_dataset must be UniMedVL records (datasets.Dataset / IterableDataset), got {type(records).__name__}.")
        super().__init__(model, args=args, train_dataset=records, processing_class=processing_class,
                         data_collator=data_collator or UniMedVLDataCollator(0, pack_tokens=args.pack_tokens), **kwargs)
        if data_collator is None:
            self.data_collator.pad_token_id = self.processing_class.tokenizer.pad_token_id or 0
        if built is None:
            from .data import records_from_dataset

            builder = SequenceBuilder(self.processing_class, CFGDropout(args.cfg_dropout_text, args.cfg_dropout_vit, args.cfg_dropout_vae))
            built = built_dataset(records_from_dataset(records), builder, seed=args.seed)
        self.train_dataset = built
        self._position_tables = self._unpersist_position_tables()
        self._batch_has_vit = True
        if getattr(self.accelerator.state, "fsdp_plugin", None) is not None:
            self._run_vision_units_every_step()
        self.ema = None
        self._resume_checkpoint = None
        self.add_callback(_TrainerHooks(self))
        self._parts = {"ce": 0.0, "mse": 0.0, "count": 0, "tokens": 0, "since": time.perf_counter()}

    # ------------------------------------------------------------------ loss

    def ema_names(self) -> list[str]:
        return [name for name, p in self.model.named_parameters() if p.requires_grad]

    def ema_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _latent_inputs(self, model, inputs: dict) -> tuple[dict, torch.Tensor | None]:
        """Timesteps `[num_vae_images]` and noise `[num_latent_tokens, 64]` for the batch's VAE images: from each
        sample's `noise_seeds` when the batch has them, else from the global RNG."""
        vae_pixel_values = inputs.pop("vae_pixel_values", None)
        latent_noised = inputs.pop("latent_noised", None)
        noise_seeds = inputs.pop("noise_seeds", None)
        images_per_sample = inputs.pop("vae_images_per_sample", None)
        if not vae_pixel_values:
            return {}, None
        config = unimedvl_module(self.accelerator.unwrap_model(model)).config
        downsample, channels = config.latent_downsample, config.patch_latent_dim
        lengths = [(image.shape[-2] // downsample) * (image.shape[-1] // downsample) for image in vae_pixel_values]
        if noise_seeds is None:
            timesteps = sample_timesteps(len(lengths), self.args.timestep_shift)
            noise = torch.randn(sum(lengths), channels)
        else:
            timesteps, noise, start = [], [], 0
            for seed, count in zip(noise_seeds, images_per_sample):
                generator = torch.Generator().manual_seed(int(seed))
                timesteps.append(sample_timesteps(count, self.args.timestep_shift, generator))
                noise.append(torch.randn(sum(lengths[start : start + count]), channels, generator=generator))
                start += count
            timesteps, noise = torch.cat(timesteps), torch.cat(noise)
        timesteps = torch.where(latent_noised.cpu(), timesteps, torch.zeros_like(timesteps))
        latent_inputs = {
            "vae_pixel_values": vae_pixel_values,
            "latent_timesteps": timesteps,
            "latent_noise": noise,
            "vae_sample": self.args.vae_sample,
        }
        return latent_inputs, latent_noised.cpu().repeat_interleave(torch.tensor(lengths))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        self._batch_has_vit = inputs.get("pixel_values") is not None
        latent_inputs, token_noised = self._latent_inputs(model, inputs)
        has_ce = bool((labels[:, 1:] != -100).any())
        outputs = model(**inputs, **latent_inputs, labels=labels if has_ce else None)
        ce = outputs.loss if has_ce else outputs.logits.sum() * 0.0
        if token_noised is not None and outputs.velocity is not None:
            target = latent_inputs["latent_noise"].to(outputs.clean_latents.device) - outputs.clean_latents
            mse = flow_matching_mse(outputs.velocity, target, token_noised.to(target.device))
        else:
            mse = outputs.logits.sum() * 0.0
        loss = self.args.ce_weight * ce + self.args.mse_weight * mse
        if model.training:
            self._parts["ce"] += float(ce.detach())
            self._parts["mse"] += float(mse.detach())
            self._parts["count"] += 1
            self._parts["tokens"] += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
        outputs.ce_loss, outputs.mse_loss = ce.detach(), mse.detach()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        parts = self._parts
        if "loss" in logs and parts["count"]:
            elapsed = time.perf_counter() - parts["since"]
            logs["ce"] = round(parts["ce"] / parts["count"], 6)
            logs["mse"] = round(parts["mse"] / parts["count"], 6)
            logs["tokens_per_second"] = round(parts["tokens"] / max(elapsed, 1e-9), 2)
            self._parts = {"ce": 0.0, "mse": 0.0, "count": 0, "tokens": 0, "since": time.perf_counter()}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ FSDP2 memory-efficient loading

    def _unpersist_position_tables(self) -> list:
        """Under FSDP2 with `cpu_ram_efficient_loading`, accelerate broadcasts the sharded *parameters* from rank 0 and
        keeps non-persistent buffers; UniMedVL's two persistent buffers, the sin-cos position tables, are made
        non-persistent for the run (a CPU placeholder on processes that built the model on the meta device), sent from
        rank 0 to the others when training starts (`share_position_tables`) and written back into `final/` by
        `full_state_dict`."""
        from modeling_unimedvl.modeling_unimedvl import UniMedVLPositionTable

        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is None or not getattr(plugin, "cpu_ram_efficient_loading", False):
            return []
        tables = [module for module in self.model.modules() if isinstance(module, UniMedVLPositionTable)]
        for module in tables:
            table = module.pos_embed
            if table.is_meta:
                table = torch.zeros(table.shape, dtype=table.dtype)
            module.register_buffer("pos_embed", table, persistent=False)
        return tables

    def share_position_tables(self) -> None:
        import torch.distributed as dist

        for module in self._position_tables:
            table = module.pos_embed.to(self.accelerator.device).contiguous()
            dist.broadcast(table, src=0)
            module.register_buffer("pos_embed", table, persistent=False)

    def _run_vision_units_every_step(self) -> None:
        """FSDP2 shards every `SiglipEncoderLayer` as its own unit, whose all-gathers every process must run in the
        same order. A batch without ViT images (e.g. text-to-image only) would skip them on that process only, so
        before the decoder runs the vision tower sees one zero patch and its features join the embeddings with weight
        0 (no effect on the loss or the gradients)."""
        language_model = unimedvl_module(self.model).model.language_model

        def hook(module, args, kwargs):
            if self._batch_has_vit:
                return None
            base = unimedvl_module(self.model).model
            patch = base.config.vision_config.patch_size
            embeds = kwargs["inputs_embeds"]
            pixels = torch.zeros(1, 3 * patch * patch, device=embeds.device, dtype=embeds.dtype)
            features = base.get_image_features(pixels, torch.ones(1, 2, dtype=torch.long, device=embeds.device))
            kwargs["inputs_embeds"] = embeds + 0.0 * features.sum()
            return args, kwargs

        language_model.register_forward_pre_hook(hook, with_kwargs=True)

    def zero_unused_gradients(self) -> None:
        """Gives every trainable parameter a gradient before the optimizer step: zeros where the step's batches did
        not use it (e.g. the generation expert when no batch holds a generation sample). AdamW then advances every
        parameter's moments and step count on every step, as under the original's FSDP training and as under FSDP2
        here (`reduce_unused_expert_gradients`), so a run gives the same weights on any number of processes."""
        for parameter in self.ema_parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)

    def reduce_unused_expert_gradients(self) -> None:
        """FSDP2 reduce-scatters the gradients of the parameters that took part in a unit's backward, and every
        process must send the same set. A Mixture-of-Transformers layer uses its generation expert only for latent
        tokens, so a process whose batch has none would send fewer: unused trainable parameters send zeros instead
        (`FSDPModule.set_reduce_scatter_unused_params`)."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.model_wrapped, FSDPModule) or isinstance(self.model, FSDPModule):
            root = self.model if isinstance(self.model, FSDPModule) else self.model_wrapped
            root.set_reduce_scatter_unused_params(True)

    # ------------------------------------------------------------------ EMA

    def start_ema(self) -> None:
        """Creates the EMA of the trainable weights (once the model is wrapped or sharded) and, when resuming, loads
        the checkpoint's EMA."""
        if self.args.ema_decay <= 0 or self.ema is not None:
            return
        self.ema = EMAModel(self.ema_parameters(), decay=self.args.ema_decay, min_decay=self.args.ema_decay)
        if self._resume_checkpoint is not None:
            self.load_ema(self._resume_checkpoint)

    def save_ema(self, directory: str) -> None:
        """Writes the EMA weights (`ema.safetensors`, trainable parameters by name) and its step counter; every
        process takes part (sharded EMA weights are gathered), the main process writes."""
        tensors = {name: full_tensor(t).contiguous() for name, t in zip(self.ema_names(), self.ema.shadow_params)}
        if self.args.should_save:
            os.makedirs(directory, exist_ok=True)
            save_file(tensors, os.path.join(directory, EMA_WEIGHTS_NAME))
            with open(os.path.join(directory, EMA_STATE_NAME), "w") as handle:
                json.dump({"decay": self.ema.decay, "optimization_step": self.ema.optimization_step}, handle)

    def load_ema(self, directory: str) -> None:
        tensors = load_file(os.path.join(directory, EMA_WEIGHTS_NAME))
        names = self.ema_names()
        missing = [name for name in names if name not in tensors]
        if missing:
            raise ValueError(f"{directory}/{EMA_WEIGHTS_NAME} lacks EMA weights of {missing[:5]} (trainable set changed?).")
        for shadow, name in zip(self.ema.shadow_params, names):
            value = tensors[name].to(shadow.dtype)
            if hasattr(shadow, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(shadow.device_mesh.device_type), shadow.device_mesh, shadow.placements)
            shadow.copy_(value)
        with open(os.path.join(directory, EMA_STATE_NAME)) as handle:
            self.ema.optimization_step = json.load(handle)["optimization_step"]

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full state dict with EMA values for the trainable parameters (collective under FSDP)."""
        state = self.full_state_dict()
        for name, shadow in zip(self.ema_names(), self.ema.shadow_params):
            key = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
            state[key] = full_tensor(shadow)
        return state

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full (gathered) state dict of the UniMedVL model on the CPU; collective under FSDP."""
        model = unimedvl_module(self.accelerator.unwrap_model(self.model))
        state = {key: full_tensor(value) for key, value in model.state_dict().items()}
        for name, module in model.named_modules():
            if module in self._position_tables:
                state[f"{name}.pos_embed"] = module.pos_embed.detach().cpu()
        return state

    # ------------------------------------------------------------------ resume

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` resumes from the last *committed* checkpoint."""
        if resume_from_checkpoint is True:
            if self.args.should_save:
                remove_uncommitted(self.args.output_dir)
            self.accelerator.wait_for_everyone()
            resume_from_checkpoint = last_committed_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No committed checkpoint-N folder to resume from in {self.args.output_dir}.")
        elif resume_from_checkpoint and not os.path.isfile(os.path.join(resume_from_checkpoint, COMMIT_NAME)):
            raise ValueError(f"{resume_from_checkpoint} is not a committed checkpoint (no {COMMIT_NAME}): it was not fully written.")
        self._resume_checkpoint = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


__all__ = [
    "EMA_WEIGHTS_NAME",
    "UniMedVLTrainer",
    "UniMedVLTrainingArguments",
    "committed_checkpoints",
    "full_tensor",
    "unimedvl_module",
]
