"""Freezing parts of UniMedVL by parameter name (before the optimizer is created).

- ViT: `model.vision_tower.*`; VAE: `model.vae.*`;
- ViT connector: `model.connector.*` (ViT features → LLM width) and the ViT position table `model.vit_pos_embed.*`:
  every input image's ViT tokens pass through it, so training it moves understanding answers even with the
  understanding expert frozen;
- understanding expert: the language model's parameters without `_moe_gen` (attention, `mlp`, layer norms, final
  `norm`, token embeddings) and `lm_head`;
- generation expert: `*_moe_gen` parameters (`q_proj_moe_gen`, `mlp_moe_gen.*`, `input_layernorm_moe_gen`,
  `norm_moe_gen`, …) and the generation heads `llm2vae`, `model.vae2llm`, `model.time_embedder`.
"""

import re

from torch import nn


FREEZE_PATTERNS = {
    "vit": r"(.*\.)?model\.vision_tower\..*",
    "vae": r"(.*\.)?model\.vae\..*",
    "connector": r"(.*\.)?model\.(connector|vit_pos_embed)\..*",
    "und": r"(.*\.)?(model\.language_model\.(?!.*_moe_gen).*|lm_head\..*)",
    "gen": r"(.*\.)?(model\.language_model\..*_moe_gen.*|llm2vae\..*|model\.vae2llm\..*|model\.time_embedder\..*)",
}
"""Full-match regexes of parameter names per freezable part."""


def parameters_of(model: nn.Module, part: str) -> list[str]:
    """Names of the parameters of `part` (a key of `FREEZE_PATTERNS`)."""
    if part not in FREEZE_PATTERNS:
        raise ValueError(f"Unknown part {part!r}; choose from {sorted(FREEZE_PATTERNS)}.")
    pattern = re.compile(FREEZE_PATTERNS[part])
    return [name for name, _ in model.named_parameters() if pattern.fullmatch(name)]


def apply_freezing(
    model: nn.Module,
    freeze_vit: bool = False,
    freeze_vae: bool = True,
    freeze_und: bool = False,
    freeze_gen: bool = False,
    freeze_connector: bool = False,
) -> dict[str, int]:
    """Sets `requires_grad=False` on the chosen parts; returns `{"trainable": n, "frozen": m}` parameter counts."""
    chosen = {"vit": freeze_vit, "vae": freeze_vae, "und": freeze_und, "gen": freeze_gen, "connector": freeze_connector}
    frozen = {name for part, on in chosen.items() if on for name in parameters_of(model, part)}
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    counts = {"trainable": 0, "frozen": 0}
    for parameter in model.parameters():
        counts["trainable" if parameter.requires_grad else "frozen"] += parameter.numel()
    if counts["trainable"] == 0:
        raise ValueError(f"Every parameter is frozen ({chosen}); unfreeze at least one part.")
    return counts


__all__ = ["FREEZE_PATTERNS", "apply_freezing", "parameters_of"]
