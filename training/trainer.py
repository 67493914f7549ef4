"""`UniMedVLTrainer`: `transformers.Trainer` with UniMedVL's CE + flow-matching loss, EMA and atomic checkpoints.

The training forward is the model's normal forward (the inference code path): the trainer VAE-encodes the batch's
images, draws one logit-normal timestep per target image, noises the targets (`x_t = (1 − t)·x_0 + t·ε`; conditioning
images keep t = 0) and calls `model(input_ids, …, latents=x_t, latent_timesteps=t, labels=…)`. The loss is
`ce_weight · CE + mse_weight · MSE` with CE the model's mean next-token cross-entropy over answer tokens and MSE the
mean over noised latent tokens of the per-token mean over 64 channels of `(velocity − (ε − x_0))²`. Both are means
over one micro-batch (the model sets `accepts_loss_kwargs = False`), so the Trainer divides by the accumulation steps.
"""

import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from .flow_matching import flow_matching_mse, sample_timesteps


EMA_WEIGHTS_NAME = "ema.safetensors"
EMA_STATE_NAME = "ema_state.json"
STAGING_DIR = ".staging"


@dataclass
class UniMedVLTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus UniMedVL's loss and EMA settings."""

    ce_weight: float = field(default=0.25, metadata={"help": "Weight of the cross-entropy on answer tokens."})
    mse_weight: float = field(default=1.0, metadata={"help": "Weight of the flow-matching MSE on noised latents."})
    timestep_shift: float = field(default=1.0, metadata={"help": "Shift s of t' = s·t / (1 + (s − 1)·t)."})
    vae_sample: bool = field(default=True, metadata={"help": "Encode images by sampling the VAE posterior (original) instead of its mean."})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA decay of the trainable weights (0 = no EMA)."})


def unimedvl_module(model: torch.nn.Module) -> torch.nn.Module:
    """The `UniMedVLForConditionalGeneration` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class _EMAUpdate(TrainerCallback):
    def __init__(self, trainer: "UniMedVLTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.ema.step(self.trainer.ema_parameters())


class UniMedVLTrainer(Trainer):
    """Trainer for UniMedVL batches from `UniMedVLDataCollator`; logs `ce`, `mse` and `tokens_per_second`.

    Checkpoints are written to `<output_dir>/.staging/checkpoint-N` and renamed to `checkpoint-N` once complete, so a
    run killed while saving never leaves a half-written checkpoint that resuming would pick up. With
    `args.ema_decay > 0` an EMA of the trainable weights (diffusers `EMAModel`) is kept, saved in every checkpoint
    (`ema.safetensors` + `ema_state.json`) and restored on resume.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, UniMedVLTrainingArguments):
            raise TypeError("UniMedVLTrainer needs UniMedVLTrainingArguments (ce_weight, mse_weight, timestep_shift, ...).")
        self.ema = None
        if self.args.ema_decay > 0:
            self.ema = EMAModel(self.ema_parameters(), decay=self.args.ema_decay, min_decay=self.args.ema_decay)
            self.add_callback(_EMAUpdate(self))
        self._parts = {"ce": 0.0, "mse": 0.0, "count": 0, "tokens": 0, "since": time.perf_counter()}

    # ------------------------------------------------------------------ loss

    def ema_names(self) -> list[str]:
        return [name for name, p in self.model.named_parameters() if p.requires_grad]

    def ema_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        vae_pixel_values = inputs.pop("vae_pixel_values", None)
        latent_noised = inputs.pop("latent_noised", None)
        labels = inputs.pop("labels")
        latent_inputs, token_noised = {}, None
        if vae_pixel_values:
            config = unimedvl_module(self.accelerator.unwrap_model(model)).config
            downsample = config.latent_downsample
            lengths = torch.tensor([(image.shape[-2] // downsample) * (image.shape[-1] // downsample) for image in vae_pixel_values])
            timesteps = sample_timesteps(len(latent_noised), self.args.timestep_shift)
            timesteps = torch.where(latent_noised, timesteps, torch.zeros_like(timesteps))
            latent_inputs = {
                "vae_pixel_values": vae_pixel_values,
                "latent_timesteps": timesteps,
                "latent_noise": torch.randn(int(lengths.sum()), config.patch_latent_dim),
                "vae_sample": self.args.vae_sample,
            }
            token_noised = latent_noised.repeat_interleave(lengths)
        has_ce = bool((labels[:, 1:] != -100).any())
        outputs = model(**inputs, **latent_inputs, labels=labels if has_ce else None)
        ce = outputs.loss if has_ce else outputs.logits.sum() * 0.0
        if token_noised is not None and outputs.velocity is not None:
            target = latent_inputs["latent_noise"].to(outputs.clean_latents.device) - outputs.clean_latents
            mse = flow_matching_mse(outputs.velocity, target, token_noised.to(target.device))
        else:
            mse = torch.zeros((), device=ce.device)
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

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        self._get_output_dir = lambda trial=None: staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
            if self.ema is not None:
                self.save_ema(staged)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            if not os.listdir(staging_root):
                os.rmdir(staging_root)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def save_ema(self, directory: str) -> None:
        """Writes the EMA weights (`ema.safetensors`, trainable parameters by name) and its step counter."""
        os.makedirs(directory, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in zip(self.ema_names(), self.ema.shadow_params)}
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
            shadow.copy_(tensors[name])
        with open(os.path.join(directory, EMA_STATE_NAME)) as handle:
            self.ema.optimization_step = json.load(handle)["optimization_step"]

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full state dict with EMA values for the trainable parameters."""
        state = {k: v.detach().cpu() for k, v in unimedvl_module(self.model).state_dict().items()}
        for name, shadow in zip(self.ema_names(), self.ema.shadow_params):
            key = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
            state[key] = shadow.detach().cpu()
        return state

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint-N folder to resume from in {self.args.output_dir}.")
        if resume_from_checkpoint and self.ema is not None:
            self.load_ema(resume_from_checkpoint)
        shutil.rmtree(os.path.join(self.args.output_dir, STAGING_DIR), ignore_errors=True)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


__all__ = ["EMA_WEIGHTS_NAME", "UniMedVLTrainer", "UniMedVLTrainingArguments", "unimedvl_module"]
