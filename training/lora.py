"""LoRA / QLoRA for UniMedVL with PEFT: per-expert presets, 4-bit NF4 base weights, adapter cards and Hub upload.

Which part a preset adapts (full-match regexes over module names):

| preset | adapts |
| --- | --- |
| `und` | the understanding expert: `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj` of every decoder layer |
| `gen` | the generation expert: `self_attn.{q,k,v,o}_proj_moe_gen` and `mlp_moe_gen.{gate,up,down}_proj` |
| `both` | `und` + `gen` |
| `vision` | SigLIP `self_attn.{q,k,v,out}_proj`, `mlp.fc1/fc2` and the ViT→LLM connector `fc1/fc2` |
| `heads` | `llm2vae` and `model.vae2llm` trained in full (`modules_to_save`), LoRA on the timestep embedder |

Presets combine: `lora_config(["und", "vision"])`. A plain PEFT `target_modules` list matches by exact name or
`.`-suffix: `["q_proj", "k_proj", "v_proj", "o_proj"]` reaches the understanding expert's attention **and SigLIP's**
`q/k/v_proj`, never the generation expert; to adapt the generation expert name its modules
(`GENERATION_EXPERT_MODULES`: `q_proj_moe_gen`, …) or use the `gen` preset. MLP names are shared:
`["gate_proj", "up_proj", "down_proj"]` hits `mlp.*` and `mlp_moe_gen.*` of both experts.

A saved adapter loads with `PeftModel.from_pretrained(base, folder)` (or `load_adapter`, which also refuses an adapter
file missing tensors) and with `peft.AutoPeftModel.from_pretrained(folder, import_allowlist=["modeling_unimedvl"])`:
the adapter config records the base class (`auto_mapping`), and PEFT imports only allow-listed packages.
"""

import os
import tempfile

import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training


_LAYER = r"(.*\.)?model\.language_model\.layers\.\d+\."
LORA_PRESETS = {
    "und": {"target": _LAYER + r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)", "save": []},
    "gen": {"target": _LAYER + r"(self_attn\.(q|k|v|o)_proj_moe_gen|mlp_moe_gen\.(gate|up|down)_proj)", "save": []},
    "vision": {
        "target": r"(.*\.)?model\.(vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))|connector\.fc(1|2))",
        "save": [],
    },
    "heads": {"target": r"(.*\.)?model\.time_embedder\.linear_(1|2)", "save": ["llm2vae", "vae2llm"]},
}
UNDERSTANDING_EXPERT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
"""Attention projections of the understanding expert (a plain list also matches SigLIP's q/k/v_proj)."""
GENERATION_EXPERT_MODULES = ["q_proj_moe_gen", "k_proj_moe_gen", "v_proj_moe_gen", "o_proj_moe_gen"]
"""Attention projections of the generation expert, for a plain PEFT `target_modules` list."""

LORA_PRESETS["both"] = {
    "target": f"({LORA_PRESETS['und']['target']})|({LORA_PRESETS['gen']['target']})",
    "save": [],
}


def lora_config(
    presets: str | list[str] = "und",
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    **kwargs,
) -> LoraConfig:
    """A `LoraConfig` for one preset name or several (their regexes joined, their `modules_to_save` merged)."""
    names = [presets] if isinstance(presets, str) else list(presets)
    unknown = [name for name in names if name not in LORA_PRESETS]
    if unknown or not names:
        raise ValueError(f"Unknown LoRA preset(s) {unknown or names}; choose from {sorted(LORA_PRESETS)}.")
    target = "|".join(f"({LORA_PRESETS[name]['target']})" for name in names)
    modules_to_save = sorted({module for name in names for module in LORA_PRESETS[name]["save"]}) or None
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target,
        modules_to_save=modules_to_save,
        bias="none",
        **kwargs,
    )


def add_lora(model: torch.nn.Module, config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Wraps `model` with a LoRA adapter; for a 4-bit model it first runs PEFT's `prepare_model_for_kbit_training`."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, config, adapter_name=adapter_name)


def load_quantized_model(path: str, compute_dtype: torch.dtype | None = None, device_map: str | dict | None = None, **kwargs):
    """UniMedVL with 4-bit NF4 (double-quantised) base weights for QLoRA; `lm_head`, `llm2vae`, `model.vae2llm`,
    `model.time_embedder`, the VAE, the connector and the ViT patch embedding stay in `compute_dtype`.

    Defaults: with a GPU, `device_map="auto"` and bfloat16 compute; on a CPU-only machine, `"cpu"` and float32."""
    from modeling_unimedvl import UniMedVLForConditionalGeneration
    from unimedvl_pipelines.quantization import bnb_config

    gpu = torch.cuda.is_available()
    compute_dtype = compute_dtype or (torch.bfloat16 if gpu else torch.float32)
    device_map = device_map or ("auto" if gpu else "cpu")

    return UniMedVLForConditionalGeneration.from_pretrained(
        path,
        quantization_config=bnb_config(bits=4, compute_dtype=compute_dtype, quant_type="nf4", double_quant=True),
        dtype=compute_dtype,
        device_map=device_map,
        **kwargs,
    )


def load_adapter(base_model: torch.nn.Module, adapter_dir: str, adapter_name: str = "default", trainable: bool = False) -> PeftModel:
    """Loads a saved adapter onto `base_model` (`trainable=True` to continue training it).

    Raises:
        ValueError: the adapter file lacks tensors that its config creates (a truncated or mismatched adapter; PEFT
            alone would only warn and leave those weights at their initial values).
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise ValueError(f"{adapter_dir} has no adapter_model.safetensors (only safetensors adapters are loaded).")
    model = PeftModel.from_pretrained(base_model, adapter_dir, adapter_name=adapter_name, is_trainable=trainable)
    with safe_open(weights, "pt") as handle:
        stored = set(handle.keys())
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    missing = sorted(expected - stored)
    if missing:
        raise ValueError(
            f"{weights} lacks {len(missing)} of the {len(expected)} adapter tensors its config creates "
            f"(e.g. {missing[0]}): the file is incomplete or was saved for another model."
        )
    return model


ADAPTER_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

LoRA adapter for [UniMedVL]({{ base_model_url }}) ({{ base_model }}), trained with `unimedvl_training`.

- Adapted parts (presets): {{ presets }}
- LoRA rank / alpha / dropout: {{ r }} / {{ alpha }} / {{ dropout }}
- Target modules (regex): `{{ target }}`
- Fully trained modules: {{ modules_to_save }}
{% if training_summary %}- Training: {{ training_summary }}
{% endif %}
## Use

```python
import modeling_unimedvl
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

base = AutoModelForImageTextToText.from_pretrained("{{ base_model }}")
model = PeftModel.from_pretrained(base, "{{ repo_id }}")
processor = AutoProcessor.from_pretrained("{{ base_model }}")
```

Merge for deployment: `model = model.merge_and_unload()`.

## Intended use and limitations

Research on medical vision-language modelling only. Not a medical device; outputs must not be used for diagnosis or
treatment decisions without review by a qualified professional.
"""


def adapter_model_card(
    peft_model: PeftModel,
    repo_id: str,
    presets: list[str] | str,
    base_model: str,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    training_summary: str = "",
) -> ModelCard:
    """A model card (`huggingface_hub.ModelCard`) describing the active adapter of `peft_model`."""
    config = peft_model.peft_config[peft_model.active_adapter]
    presets = [presets] if isinstance(presets, str) else list(presets)
    card_data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        license=license,
        datasets=datasets,
        pipeline_tag="image-text-to-text",
        tags=["unimedvl", "lora", "medical", *[f"lora-{name}" for name in presets]],
    )
    base_model_url = base_model if os.path.isdir(base_model) else f"https://huggingface.co/{base_model}"
    return ModelCard.from_template(
        card_data,
        template_str=ADAPTER_CARD_TEMPLATE,
        title=f"{repo_id.split('/')[-1]} (UniMedVL LoRA adapter)",
        base_model=base_model,
        base_model_url=base_model_url,
        repo_id=repo_id,
        presets=", ".join(presets),
        r=config.r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target=config.target_modules,
        modules_to_save=", ".join(config.modules_to_save or []) or "none",
        training_summary=training_summary,
    )


def push_adapter_to_hub(
    peft_model: PeftModel,
    repo_id: str,
    presets: list[str] | str,
    base_model: str,
    private: bool = True,
    token: str | None = None,
    commit_message: str = "Upload UniMedVL LoRA adapter",
    api=None,
    **card_kwargs,
) -> str:
    """Saves the adapter with its model card to a temporary folder and uploads it to `repo_id` (created if needed).

    `api` defaults to `huggingface_hub.HfApi(token=token)`. Returns the commit URL reported by `upload_folder`.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    card = adapter_model_card(peft_model, repo_id, presets, base_model, **card_kwargs)
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)
        card.save(os.path.join(folder, "README.md"))
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, repo_type="model")


__all__ = [
    "GENERATION_EXPERT_MODULES",
    "LORA_PRESETS",
    "UNDERSTANDING_EXPERT_MODULES",
    "adapter_model_card",
    "add_lora",
    "load_adapter",
    "load_quantized_model",
    "lora_config",
    "prepare_model_for_kbit_training",
    "push_adapter_to_hub",
]
