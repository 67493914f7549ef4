"""Work of UniMedVL computed from its configuration: parameter counts, FLOPs and the bytes that must cross device
memory, for the roofline limits of the benchmarks.

Conventions: a matrix product of an `n×k` by a `k×m` matrix is `2·n·k·m` FLOPs; attention is counted over the
query × key rectangle that the query tokens are allowed to see (`4·heads·head_dim` FLOPs per query–key pair for
`QKᵀ` and `PV`); norms, activations and softmax are left out. Every token passes through one expert of the
Mixture-of-Transformers (understanding or generation); both experts have the same size. The VAE's FLOPs are counted
by `torch.utils.flop_counter` on a meta-device copy built from the same configuration.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from torch.utils.flop_counter import FlopCounterMode

from modeling_unimedvl.sampling_unimedvl import denoising_schedule


@dataclass(frozen=True)
class ModelGeometry:
    """Sizes of one UniMedVL configuration (all counts in parameters unless stated)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    expert_params: int
    """One expert: its decoder-layer weights, biases and norms plus its final norm."""
    expert_matmul_params: int
    """Weights of the expert's matrix products (the FLOP-carrying part of `expert_params`)."""
    embed_params: int
    lm_head_params: int
    vision_params: int
    vision_matmul_params: int
    vision_layers: int
    vision_hidden: int
    connector_params: int
    latent_io_params: int
    """`vae2llm`, `llm2vae` and the time embedder."""

    @property
    def kv_elements_per_token(self) -> int:
        """Keys and values cached per token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim

    @property
    def llm_params(self) -> int:
        return 2 * self.expert_params + self.embed_params + self.lm_head_params

    @property
    def total_params(self) -> int:
        """Trainable-model parameters without the VAE (which is separate in the release) and the frozen tables."""
        return self.llm_params + self.vision_params + self.connector_params + self.latent_io_params


def model_geometry(config) -> ModelGeometry:
    """Counts the parameters of a `UniMedVLConfig` without building the model."""
    text, vision = config.text_config, config.vision_config
    hidden, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    attention_matmul = hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden
    attention_extra = q_dim + 2 * kv_dim + 2 * head_dim  # q/k/v biases, q/k norms
    layer_matmul = attention_matmul + 3 * hidden * inter
    layer_params = layer_matmul + attention_extra + 2 * hidden  # two RMS norms

    v_hidden, v_inter, v_layers = vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers
    patch_dim = vision.num_channels * vision.patch_size**2
    v_layer_matmul = 4 * v_hidden * v_hidden + 2 * v_hidden * v_inter
    v_layer_params = v_layer_matmul + 4 * v_hidden + v_inter + v_hidden + 4 * v_hidden  # biases, two LayerNorms
    v_positions = (vision.image_size // vision.patch_size) ** 2 * v_hidden
    vision_params = patch_dim * v_hidden + v_hidden + v_positions + v_layers * v_layer_params + 2 * v_hidden
    latent_dim = config.patch_latent_dim
    return ModelGeometry(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=text.vocab_size,
        expert_params=layers * layer_params + hidden,
        expert_matmul_params=layers * layer_matmul,
        embed_params=text.vocab_size * hidden,
        lm_head_params=text.vocab_size * hidden,
        vision_params=vision_params,
        vision_matmul_params=patch_dim * v_hidden + v_layers * v_layer_matmul,
        vision_layers=v_layers,
        vision_hidden=v_hidden,
        connector_params=v_hidden * hidden + hidden + hidden * hidden + hidden,
        latent_io_params=(latent_dim * hidden + hidden) + (hidden * latent_dim + latent_dim) + (256 * hidden + hidden + hidden * hidden + hidden),
    )


# ---------------------------------------------------------------------------------------------------------- FLOPs


def llm_flops(geometry: ModelGeometry, tokens: int, attended_pairs: int, logit_tokens: int) -> float:
    """Forward FLOPs of the decoder for `tokens` tokens that see `attended_pairs` query–key pairs in total, with the
    language-model head applied to `logit_tokens` positions."""
    return (
        2 * geometry.expert_matmul_params * tokens
        + 4 * geometry.layers * geometry.heads * geometry.head_dim * attended_pairs
        + 2 * geometry.lm_head_params * logit_tokens
    )


def vision_flops(geometry: ModelGeometry, image_tokens: list[int]) -> float:
    """Forward FLOPs of SigLIP + connector for images of `image_tokens` patches each (bidirectional attention)."""
    connector = geometry.vision_hidden * geometry.hidden + geometry.hidden * geometry.hidden
    return sum(
        2 * (geometry.vision_matmul_params + connector) * n + 4 * geometry.vision_layers * geometry.vision_hidden * n * n
        for n in image_tokens
    )


def latent_io_flops(geometry: ModelGeometry, latent_tokens: int) -> float:
    """Forward FLOPs of `vae2llm`, the per-token time embedder and `llm2vae` for `latent_tokens` tokens."""
    return 2 * (geometry.latent_io_params - 3 * geometry.hidden - 64) * latent_tokens


@lru_cache(maxsize=16)
def _vae_flops(vae_items: tuple, part: str, height: int, width: int) -> float:
    with torch.device("meta"):
        vae = AutoencoderKL(**dict(vae_items))
        if part == "decode":
            down = 2 ** (len(vae.config.block_out_channels) - 1)
            tensor = torch.empty(1, vae.config.latent_channels, height // down, width // down)
        else:
            tensor = torch.empty(1, vae.config.in_channels, height, width)
    with FlopCounterMode(display=False) as counter:
        vae.decode(tensor) if part == "decode" else vae.encode(tensor)
    return float(counter.get_total_flops())


def vae_flops(config, part: str, height: int, width: int) -> float:
    """FLOPs of one VAE `part` ("encode" or "decode") of a `height × width` image (counted on the meta device)."""
    if part not in ("encode", "decode"):
        raise ValueError(f"part must be 'encode' or 'decode', got {part!r}.")
    items = tuple((key, tuple(value) if isinstance(value, list) else value) for key, value in sorted(config.vae_config.items()))
    return _vae_flops(items, part, height, width)


# ---------------------------------------------------------------------------------------------------------- floors


@dataclass
class Work:
    """FLOPs and device-memory bytes of a piece of work, and its roofline floor at given ceilings."""

    flops: float = 0.0
    bytes: float = 0.0
    floor_seconds: float = 0.0

    def add(self, flops: float, num_bytes: float, matmul_throughput: float, bandwidth: float) -> "Work":
        """Adds one kernel-sequential stage; its floor is the larger of its compute and memory times."""
        self.flops += flops
        self.bytes += num_bytes
        self.floor_seconds += max(flops / matmul_throughput, num_bytes / bandwidth)
        return self


def decode_step(geometry: ModelGeometry, contexts: list[int], bytes_per_element: int) -> tuple[float, float]:
    """FLOPs and bytes of one decode step of `len(contexts)` rows, row `r` attending to `contexts[r]` cached tokens
    plus itself: the understanding expert and `lm_head` weights are read once, every row's cache is read and its new
    keys/values written."""
    rows = len(contexts)
    pairs = sum(c + 1 for c in contexts)
    flops = llm_flops(geometry, rows, pairs, rows)
    weights = (geometry.expert_params + geometry.lm_head_params) * bytes_per_element
    cache = geometry.kv_elements_per_token * (sum(contexts) + rows) * bytes_per_element
    return flops, weights + cache


def prefill(geometry: ModelGeometry, lengths: list[int], image_tokens: list[int], bytes_per_element: int) -> tuple[float, float]:
    """FLOPs and bytes of prefilling rows of `lengths` tokens (logits of the last token only), including the ViT over
    `image_tokens` patches per image; attention counted as the full `length²` rectangle of each row (the image
    block is bidirectional, the few text tokens causal)."""
    flops = llm_flops(geometry, sum(lengths), sum(n * n for n in lengths), len(lengths)) + vision_flops(geometry, image_tokens)
    weights = (geometry.expert_params + geometry.lm_head_params + geometry.vision_params + geometry.connector_params) * bytes_per_element
    cache = geometry.kv_elements_per_token * sum(lengths) * bytes_per_element
    return flops, weights + cache


def flow_step(geometry: ModelGeometry, latent_tokens: int, contexts: list[int], bytes_per_element: int) -> tuple[float, float]:
    """FLOPs and bytes of one denoising call of `len(contexts)` rows: the query block `[<|vision_start|>, latents,
    <|vision_end|>]` (latents through the generation expert, the two markers through the understanding expert)
    attends to its row's cached context and to itself; both experts' weights are read."""
    query = latent_tokens + 2
    rows = len(contexts)
    pairs = sum(query * (c + query) for c in contexts)
    flops = llm_flops(geometry, rows * query, pairs, 0) + latent_io_flops(geometry, rows * latent_tokens)
    weights = (2 * geometry.expert_params + geometry.latent_io_params) * bytes_per_element
    cache = geometry.kv_elements_per_token * sum(contexts) * bytes_per_element
    return flops, weights + cache


def flow_schedule(num_inference_steps: int, shift: float, cfg_interval: tuple[float, float], use_text: bool, use_image: bool) -> list[int]:
    """Branches (model rows per image) of every Euler step: the model's own schedule (`denoising_schedule`)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return list(denoising_schedule(scheduler, num_inference_steps, cfg_interval, use_text, use_image).branches)


def training_flops(geometry: ModelGeometry, row_lengths: list[int], image_tokens: list[int], latent_tokens: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 × forward) of padded rows of `row_lengths` real
    tokens: the decoder (logits at every position, as the model computes them), the ViT over `image_tokens`, the
    latent embedding/heads; attention over each row's real `length²` rectangle. Activation recomputation is not
    counted (model FLOPs, not hardware FLOPs)."""
    tokens = sum(row_lengths)
    forward = (
        llm_flops(geometry, tokens, sum(n * n for n in row_lengths), tokens)
        + vision_flops(geometry, image_tokens)
        + latent_io_flops(geometry, latent_tokens)
    )
    return 3 * forward


__all__ = [
    "ModelGeometry",
    "Work",
    "decode_step",
    "flow_schedule",
    "flow_step",
    "latent_io_flops",
    "llm_flops",
    "model_geometry",
    "prefill",
    "training_flops",
    "vae_flops",
    "vision_flops",
]
