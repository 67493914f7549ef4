"""UniMedVL: SigLIP NaViT + Qwen2 Mixture-of-Transformers (understanding and generation experts) + FLUX VAE.

One packed sequence holds text tokens, ViT patch tokens and VAE latent tokens. Every token is routed by type to the
understanding expert (text and ViT tokens) or the generation expert (latent tokens); both experts' queries, keys and
values meet in one joint attention. Text is causal; an image block (`<|vision_start|>` … `<|vision_end|>`) is
bidirectional inside and shares one RoPE position; a noised image block is invisible to later tokens.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from transformers import (
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.generation import CompileConfig
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    bidirectional_mask_function,
    create_bidirectional_mask,
    create_causal_mask,
    create_masks_for_generate,
    eager_mask,
    sdpa_mask,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.models.siglip.modeling_siglip import SiglipEncoder
from transformers.utils import ModelOutput, logging

from .configuration_unimedvl import UniMedVLConfig
from .loading_checks import checked_model_from_pretrained
from .safetensors_reader import CheckpointError  # what loading raises; a direct import, so that remote-code
# loaders which copy only a module's own relative imports (diffusers) bring this file along
from .sampling_unimedvl import (
    CfgGuidance,
    DenoisingSchedule,
    check_callback_latents,
    check_finite_number,
    check_sampler_arguments,
    combine_cfg_velocity,
    denoising_schedule,
    euler_step,
    generators_on,
    initial_noise,
    vae_precision,
)


CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
"""Name of the KV cache in transformers' model outputs and in what `generate()` passes to `forward`: `cache` from
transformers 5.24 on, `past_key_values` before. The forwards accept both names."""


logger = logging.get_logger(__name__)


def cast_to_compute_dtype(tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`tensor` in the dtype of `module`'s floating-point weight (a module kept in float32 under float16 loading); a
    quantized weight (uint8 / int8 storage) leaves it as it is, since bitsandbytes layers cast to their compute dtype."""
    weight = module.weight
    return tensor.to(weight.dtype) if weight.is_floating_point() else tensor


# ----------------------------------------------------------------------------------------------------------------------
# Token routing and sequence structure
# ----------------------------------------------------------------------------------------------------------------------


class TokenRouting:
    """Flat indices `[n_und]` / `[n_gen]` of the understanding and generation tokens of a `[batch, seq]` block of hidden
    states; both `None` when every token is an understanding token. Build it once per chunk with `from_mask` (which
    reads the mask's nonzero entries) or from precomputed indices (the denoising steps: no host synchronisation)."""

    def __init__(self, und_index: torch.Tensor | None = None, gen_index: torch.Tensor | None = None):
        self.und_index, self.gen_index = und_index, gen_index

    @classmethod
    def from_mask(cls, gen_token_mask: torch.Tensor | None) -> "TokenRouting":
        """Routing of the latent tokens marked by `gen_token_mask` `[batch, seq]` (None: all understanding)."""
        if gen_token_mask is None:
            return cls()
        flat = gen_token_mask.reshape(-1)
        gen_index = flat.nonzero().squeeze(-1)
        if gen_index.numel() == 0:
            return cls()
        return cls((~flat).nonzero().squeeze(-1), gen_index)

    def __call__(self, hidden_states: torch.Tensor, und_fn: Callable, gen_fn: Callable) -> torch.Tensor:
        """Applies `und_fn` to understanding tokens and `gen_fn` to generation tokens of `[batch, seq, ...]`."""
        if self.gen_index is None:
            return und_fn(hidden_states)
        batch, seq = hidden_states.shape[:2]
        flat = hidden_states.reshape(batch * seq, *hidden_states.shape[2:])
        und_out = und_fn(flat.index_select(0, self.und_index))
        gen_out = gen_fn(flat.index_select(0, self.gen_index))
        out = und_out.new_empty((batch * seq, *und_out.shape[1:]))
        out.index_copy_(0, self.und_index, und_out)
        out.index_copy_(0, self.gen_index, gen_out.to(und_out.dtype))
        return out.reshape(batch, seq, *und_out.shape[1:])


@dataclass
class SequenceStructure:
    """Per-token structure of a chunk of `input_ids` (all `[batch, seq]`).

    `position_ids`: RoPE positions (every token of an image block shares one); `block_ids`: index of the image block a
    token belongs to, -1 for text; `noise_mask`: tokens of noised image blocks; `gen_token_mask`: latent tokens, routed
    to the generation expert; `latent_block_mask`: every token of a latent (VAE) image block, its `<|vision_start|>` /
    `<|vision_end|>` included (the chunks the original runs in its "gen" mode); `next_position`: `[batch]` RoPE
    position that the next token would get.
    """

    position_ids: torch.Tensor
    block_ids: torch.Tensor
    noise_mask: torch.Tensor
    gen_token_mask: torch.Tensor
    latent_block_mask: torch.Tensor
    next_position: torch.Tensor


def _whole_blocks(token_mask: torch.Tensor, block_ids: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Every token of the image blocks that hold at least one token of `token_mask` (all `[batch, seq]`)."""
    slots = block_ids.clamp(min=0)  # a block index is below the sequence length
    held = torch.zeros(block_ids.shape, dtype=torch.long, device=block_ids.device)
    held.scatter_reduce_(1, slots, (token_mask & inside).long(), reduce="amax")
    return inside & held.gather(1, slots).bool()


def sequence_structure(
    input_ids: torch.Tensor,
    config: UniMedVLConfig,
    attention_mask: torch.Tensor | None = None,
    latent_noise_mask: torch.Tensor | None = None,
) -> SequenceStructure:
    """Derives positions, image blocks and expert routing from `input_ids` `[batch, seq]` (no cache before them).

    `attention_mask` `[batch, seq]` marks real tokens (padding gets position 0). `latent_noise_mask` `[batch, seq]`
    marks latent tokens of noised images: their whole block becomes a noise block that does not advance the position.
    """
    is_start = input_ids == config.vision_start_token_id
    is_end = input_ids == config.vision_end_token_id
    opened = is_start.long().cumsum(-1)
    inside = (opened - is_end.long().cumsum(-1) + is_end.long()) > 0
    block_ids = torch.where(inside, opened - 1, -1)
    gen_token_mask = input_ids == config.latent_token_id
    latent_block_mask = _whole_blocks(gen_token_mask, block_ids, inside)
    noise_mask = torch.zeros_like(inside)
    if latent_noise_mask is not None:
        noise_mask = _whole_blocks(latent_noise_mask.bool(), block_ids, inside)

    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(inside)
    advances = real & (~inside | (is_end & ~noise_mask))
    cumulative = advances.long().cumsum(-1)
    position_ids = (cumulative - advances.long()).masked_fill(~real, 0)
    return SequenceStructure(position_ids, block_ids, noise_mask, gen_token_mask, latent_block_mask, cumulative[:, -1])


def cfg_context_masks(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: UniMedVLConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens of `input_ids` `[batch, seq]` form the two guidance contexts of image generation, as the original's
    `interleave_inference` builds them (bool masks `[batch, seq]`).

    Text guidance: the context as it stood when it was last copied, which happens before every text segment and after
    every image (its VAE and ViT blocks): everything before the last text segment, or everything up to the last image
    when that came later (an image given last makes the text-guidance context the full one). Image guidance: every
    text segment, no image (the think system prompt included in both).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    in_image = sequence_structure(input_ids, config, attention_mask).block_ids >= 0
    index = torch.arange(input_ids.shape[1], device=input_ids.device)
    text_starts = (input_ids == config.bos_token_id) & real & ~in_image
    image_ends = (input_ids == config.vision_end_token_id) & real
    last_text = torch.where(text_starts, index, -1).amax(dim=1, keepdim=True)
    after_last_image = torch.where(image_ends, index + 1, 0).amax(dim=1, keepdim=True)
    return index < torch.maximum(last_text, after_last_image), real & ~in_image


def chunk_mask_function(
    block_ids: torch.Tensor,
    noise_mask: torch.Tensor,
    q_offset: int | torch.Tensor,
    sample_ids: torch.Tensor | None = None,
) -> Callable:
    """The attention pattern of a chunk of `q` new tokens (`block_ids`, `noise_mask`, `sample_ids`: `[batch, q]`)
    appended after `q_offset` cached ones, as a `transformers.masking_utils` mask function `(batch_idx, head_idx,
    q_idx, kv_idx) → visible` over absolute key positions. It only indexes tensors, so it broadcasts over index
    tensors (SDPA / eager masks) and runs inside flex attention's block masks.

    Cached tokens are visible to every new token (bottom-right causal alignment); among the new tokens, text is
    causal, an image block sees itself entirely, and a noise block is invisible outside itself; `sample_ids` (packed
    training rows) confine attention to one sample. Keys after the chunk (an unused static-cache tail) are hidden.
    """
    q_length = block_ids.shape[1]

    def mask_function(batch_idx, head_idx, q_idx, kv_idx):
        query = (q_idx - q_offset).clamp(0, q_length - 1)
        key = kv_idx - q_offset
        key_in_chunk = (key >= 0) & (key < q_length)
        key = key.clamp(0, q_length - 1)
        query_block = block_ids[batch_idx, query]
        same_block = key_in_chunk & (query_block >= 0) & (query_block == block_ids[batch_idx, key])
        visible = ((kv_idx <= q_idx) | same_block) & ~(key_in_chunk & noise_mask[batch_idx, key] & ~same_block)
        if sample_ids is not None:
            visible = visible & (~key_in_chunk | (sample_ids[batch_idx, query] == sample_ids[batch_idx, key]))
        return visible

    return mask_function


def chunk_attention_mask(
    config: PreTrainedConfig,
    inputs_embeds: torch.Tensor,
    padding_mask: torch.Tensor | None,
    q_offset: int,
    kv_length: int,
    mask_function: Callable,
):
    """The attention mask of a chunk `inputs_embeds` `[batch, q, hidden]` appended after `q_offset` cached tokens, in the
    form that `config`'s attention implementation takes (`masking_utils`' mask interface): boolean `[batch, 1, q,
    kv_length]` for SDPA, additive float (0 / dtype min) for eager, a `BlockMask` for flex attention. `padding_mask`
    `[batch, ≤ kv_length]` marks real tokens."""
    implementation = config._attn_implementation
    make_mask = ALL_MASK_ATTENTION_FUNCTIONS[implementation] if implementation in ALL_MASK_ATTENTION_FUNCTIONS else sdpa_mask
    batch, q_length = inputs_embeds.shape[:2]
    return make_mask(
        batch_size=batch,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=0,
        mask_function=mask_function,
        attention_mask=padding_mask.bool() if padding_mask is not None else None,
        allow_is_causal_skip=False,
        dtype=inputs_embeds.dtype,
        config=config,
        use_vmap=False,
        device=inputs_embeds.device,
    )


def key_padding_attention_mask(config: PreTrainedConfig, padding_mask: torch.Tensor, dtype: torch.dtype):
    """The mask of a bidirectional sequence with padding `padding_mask` `[batch, length]` (1 = real; the ViT's packed
    images): None without padding, so that SDPA uses its fused kernels; for SDPA and eager one additive row `[batch, 1,
    1, length]` broadcast over the queries (nothing materialised per layer); for other implementations what
    `masking_utils` builds for them (a flex `BlockMask`)."""
    if config._attn_implementation not in ("sdpa", "eager"):
        return create_bidirectional_mask(config, padding_mask.new_empty(*padding_mask.shape, 0, dtype=dtype), padding_mask)
    return eager_mask(
        batch_size=padding_mask.shape[0],
        q_length=1,
        kv_length=padding_mask.shape[1],
        mask_function=bidirectional_mask_function,
        attention_mask=padding_mask.bool(),
        allow_is_bidirectional_skip=True,
        dtype=dtype,
        device=padding_mask.device,
    )


@dataclass(frozen=True)
class KeyPaddingGroups:
    """The attention pattern of a block that sees every real key of a left-padded batch (the denoising block against
    its guidance contexts), as row groups instead of a mask: `groups` holds `(first_row, end_row, first_key)` for runs
    of rows with the same amount of left padding. Attention runs once per group on its keys from `first_key` on, with
    no mask at all, so that SDPA (or flash / flex attention) uses its fused kernels."""

    groups: tuple[tuple[int, int, int], ...]

    @classmethod
    def from_padding(cls, padding_mask: torch.Tensor) -> "KeyPaddingGroups":
        """Groups of a left-padded `padding_mask` `[rows, kv_length]` (1 = real token); reads it on the host once."""
        real = padding_mask.bool()
        first_real = real.shape[1] - real.sum(dim=1)
        if not bool((real == (torch.arange(real.shape[1], device=real.device) >= first_real[:, None])).all()):
            raise ValueError("KeyPaddingGroups needs left padding: every row's real tokens must come last.")
        starts, groups, first = first_real.tolist(), [], 0
        for row in range(1, len(starts) + 1):
            if row == len(starts) or starts[row] != starts[first]:
                groups.append((first, row, starts[first]))
                first = row
        return cls(tuple(groups))


def build_attention_mask(
    block_ids: torch.Tensor,
    noise_mask: torch.Tensor,
    padding_mask: torch.Tensor | None,
    past_length: int,
    kv_length: int,
    dtype: torch.dtype,
    sample_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive attention mask `[batch, 1, q, kv_length]` (0 visible, dtype min hidden) of a chunk of `q` new tokens
    appended to `past_length` cached ones: the dense form of [`chunk_mask_function`], with `padding_mask` `[batch,
    ≤ kv_length]` (1 = real token); what the eager attention receives."""
    batch, q_length = block_ids.shape
    return eager_mask(
        batch_size=batch,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=past_length,
        mask_function=chunk_mask_function(block_ids, noise_mask, past_length, sample_ids),
        attention_mask=padding_mask.bool() if padding_mask is not None else None,
        dtype=dtype,
        device=block_ids.device,
    )


class ReadOnlyContextLayer(CacheLayerMixin):
    """A cache layer that holds fixed context keys and values `[batch, kv_heads, context, head_dim]` (None: no context):
    `update` returns the context followed by the new chunk's keys and values without storing the chunk. The denoising
    steps attend to the prefilled guidance contexts this way and never write their noisy block."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None):
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = keys is not None
        if keys is not None:
            self.device = keys.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the context is given."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            return key_states, value_states
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1


class ReadOnlyContextCache(Cache):
    """A cache of [`ReadOnlyContextLayer`]s: attends every chunk to a fixed context without writing the chunk."""

    def __init__(self, layers: list[ReadOnlyContextLayer]):
        super().__init__(layers=layers)

    @classmethod
    def from_cache(cls, cache: Cache, rows: int | None = None) -> "ReadOnlyContextCache":
        """Views (no copy) of the first `rows` batch rows (all by default) of the filled positions of `cache`."""
        length = int(cache.get_seq_length())
        selected = slice(rows)

        def context(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return tensor[selected, :, :length] if tensor is not None and tensor.dim() == 4 and length > 0 else None

        return cls([ReadOnlyContextLayer(context(layer.keys), context(layer.values)) for layer in cache.layers])


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


class UniMedVLPositionTable(nn.Module):
    """Frozen 2-D sin-cos table `[grid², dim]`; row `h * grid + w` encodes column `w` in its first half, row `h` in the second."""

    def __init__(self, grid_size: int, dim: int):
        super().__init__()
        self.grid_size = grid_size
        self.register_buffer("pos_embed", torch.empty(grid_size * grid_size, dim), persistent=True)

    def compute_table(self) -> torch.Tensor:
        return get_2d_sincos_pos_embed(self.pos_embed.shape[1], self.grid_size, base_size=self.grid_size)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def grid_position_ids(grid_hw: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Packed table indices `h * grid_size + w` of images with `grid_hw` `[num_images, 2]` patches (top-left sub-grid)."""
    ids = []
    for height, width in grid_hw.tolist():
        if height > grid_size or width > grid_size:
            raise ValueError(
                f"An image of {height}x{width} patches exceeds the {grid_size}x{grid_size} position table; "
                "resize it with the processor (UniMedVLProcessor) before calling the model."
            )
        rows = torch.arange(height, device=grid_hw.device)[:, None] * grid_size
        ids.append((rows + torch.arange(width, device=grid_hw.device)[None, :]).flatten())
    return torch.cat(ids)


class UniMedVLVisionEmbeddings(nn.Module):
    """SigLIP NaViT embeddings: a Linear patch embedding of flattened `(row, col, channel)` patches + learned positions."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)
        self.position_embedding = nn.Embedding((config.image_size // config.patch_size) ** 2, config.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """`patches` `[num_patches, 3 * p * p]`, `position_ids` `[num_patches]` → `[num_patches, hidden]`."""
        embeddings = self.patch_embedding(cast_to_compute_dtype(patches, self.patch_embedding))
        return embeddings + self.position_embedding(position_ids)


class UniMedVLConnector(nn.Module):
    """Two-layer MLP from ViT features to the language model's hidden size."""

    def __init__(self, config: UniMedVLConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.act = ACT2FN[config.connector_act]
        self.fc2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(cast_to_compute_dtype(features, self.fc1))))


class UniMedVLAttention(nn.Module):
    """Joint attention of both experts: each token uses its expert's q/k/v/o projections and q/k norms."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False  # the mask is always explicit
        q_dim = config.num_attention_heads * self.head_dim
        kv_dim = config.num_key_value_heads * self.head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(config.hidden_size, q_dim, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(config.hidden_size, kv_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(config.hidden_size, kv_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(q_dim, config.hidden_size, bias=False))
            setattr(self, f"q_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps))

    def _project(self, hidden_states: torch.Tensor, routing: TokenRouting, name: str) -> torch.Tensor:
        """Per-expert projection: `[batch, seq, hidden]` → `[batch, seq, heads, head_dim]`."""
        proj, proj_gen = getattr(self, f"{name}_proj"), getattr(self, f"{name}_proj_moe_gen")
        return routing(hidden_states, proj, proj_gen).view(*hidden_states.shape[:2], -1, self.head_dim)

    def _norm_and_rotate(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        routing: TokenRouting,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        float32_qk_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert q/k RMS norms, then RoPE: `[batch, seq, heads, head_dim]` → `[batch, heads, seq, head_dim]`.

        Tokens of `float32_qk_mask` `[batch, seq]` compute both in float32 and round once to the model's dtype, as the
        original does for the chunks of its "gen" mode (VAE blocks) under bfloat16; the other tokens stay in the
        model's dtype throughout, as its "und" mode.
        """
        cos, sin = position_embeddings

        def normed(states: torch.Tensor, name: str) -> torch.Tensor:
            norm, norm_gen = getattr(self, f"{name}_norm"), getattr(self, f"{name}_norm_moe_gen")
            return routing(states, norm, norm_gen).transpose(1, 2)

        rotated = apply_rotary_pos_emb(normed(query, "q"), normed(key, "k"), cos, sin)
        if float32_qk_mask is None:
            return rotated
        rotated_float32 = apply_rotary_pos_emb(normed(query.float(), "q"), normed(key.float(), "k"), cos, sin)
        select = float32_qk_mask[:, None, :, None]
        return tuple(torch.where(select, full.to(low.dtype), low) for full, low in zip(rotated_float32, rotated))

    def forward(
        self,
        hidden_states: torch.Tensor,
        routing: TokenRouting,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: "torch.Tensor | KeyPaddingGroups | None",
        cache: Cache | None = None,
        float32_qk_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`attention_mask` as the attention implementation takes it, or [`KeyPaddingGroups`] (rows attended in
        groups, each to its real keys, without a mask)."""
        query, key, value = (self._project(hidden_states, routing, name) for name in ("q", "k", "v"))
        query, key = self._norm_and_rotate(query, key, routing, position_embeddings, float32_qk_mask)
        value = value.transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        options = dict(dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs)
        if isinstance(attention_mask, KeyPaddingGroups):
            attn_output = torch.cat(
                [
                    attention_interface(self, query[a:b], key[a:b, :, start:], value[a:b, :, start:], None, **options)[0]
                    for a, b, start in attention_mask.groups
                ]
            )
        else:
            attn_output, _ = attention_interface(self, query, key, value, attention_mask, **options)
        attn_output = attn_output.reshape(*hidden_states.shape[:2], -1)
        return routing(attn_output, self.o_proj, self.o_proj_moe_gen)


class UniMedVLDecoderLayer(GradientCheckpointingLayer):
    """Qwen2 decoder layer with a duplicated generation expert (`*_moe_gen`) and one joint attention."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.self_attn = UniMedVLAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.mlp_moe_gen = Qwen2MLP(config)
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(self, name, Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps))
            setattr(self, f"{name}_moe_gen", Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps))

    def forward(
        self,
        hidden_states: torch.Tensor,
        routing: TokenRouting,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = routing(hidden_states, self.input_layernorm, self.input_layernorm_moe_gen)
        hidden_states = self.self_attn(hidden_states, routing, position_embeddings, attention_mask, cache, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = routing(hidden_states, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        hidden_states = routing(hidden_states, self.mlp, self.mlp_moe_gen)
        return residual + hidden_states


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained models
# ----------------------------------------------------------------------------------------------------------------------


class UniMedVLPreTrainedModel(PreTrainedModel):
    config: UniMedVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["UniMedVLDecoderLayer", "SiglipEncoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` that refuses damaged folders (pickled-only or broken safetensors, missing or
        mis-shaped weights, NaN/inf values) with an error naming the file and key; see `loading_checks`."""
        return checked_model_from_pretrained(super().from_pretrained, cls, pretrained_model_name_or_path, *model_args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, UniMedVLPositionTable):
            init.copy_(module.pos_embed, module.compute_table())


class UniMedVLVisionModel(UniMedVLPreTrainedModel):
    """SigLIP NaViT encoder over packed images of different sizes; returns `post_layernorm` of the last layer."""

    config: SiglipVisionConfig
    base_model_prefix = "vision_tower"
    main_input_name = "pixel_values"

    def __init__(self, config: SiglipVisionConfig):
        super().__init__(config)
        self.embeddings = UniMedVLVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor) -> torch.Tensor:
        """`pixel_values` `[num_patches, 3 * p * p]` of images with `image_grid_hw` `[num_images, 2]` → `[num_patches, hidden]`."""
        grid_side = self.config.image_size // self.config.patch_size
        embeddings = self.embeddings(pixel_values, grid_position_ids(image_grid_hw, grid_side))
        embeddings = cast_to_compute_dtype(embeddings, self.post_layernorm)  # float32 embeddings, float16 encoder
        lengths = (image_grid_hw[:, 0] * image_grid_hw[:, 1]).tolist()
        sequences = list(embeddings.split(lengths))
        padded = nn.utils.rnn.pad_sequence(sequences, batch_first=True)
        valid = nn.utils.rnn.pad_sequence([torch.ones(n, dtype=torch.bool) for n in lengths], batch_first=True)
        valid = valid.to(padded.device)
        mask = key_padding_attention_mask(self.config, valid, padded.dtype)
        hidden_states = self.encoder(inputs_embeds=padded, attention_mask=mask).last_hidden_state
        return self.post_layernorm(hidden_states[valid])


class UniMedVLTextModel(UniMedVLPreTrainedModel):
    """Qwen2 Mixture-of-Transformers decoder: understanding and generation experts with a shared attention."""

    config: Qwen2Config
    base_model_prefix = "language_model"

    def __init__(self, config: Qwen2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([UniMedVLDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        gen_token_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        latent_block_mask: torch.Tensor | None = None,
        routing: TokenRouting | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`inputs_embeds` `[batch, seq, hidden]`, `attention_mask` as the attention implementation takes it (see
        [`chunk_attention_mask`]), `position_ids` `[batch, seq]`; `gen_token_mask` `[batch, seq]` routes tokens to the
        generation expert. `routing` (a [`TokenRouting`]) and `position_embeddings` (RoPE `(cos, sin)`) may be given
        precomputed instead of `gen_token_mask` and `position_ids`.

        `latent_block_mask` `[batch, seq]` marks the tokens of latent (VAE) image blocks: in inference below float32
        their q/k norms and RoPE run in float32, as in the original's "gen" mode.
        """
        if routing is None:
            routing = TokenRouting.from_mask(gen_token_mask)
        if position_embeddings is None:
            position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        in_gen_mode = routing.gen_index is not None and not self.training and inputs_embeds.dtype != torch.float32
        float32_qk_mask = latent_block_mask if in_gen_mode else None
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                routing,
                position_embeddings,
                attention_mask,
                cache=cache,
                float32_qk_mask=float32_qk_mask,
                **kwargs,
            )
        hidden_states = routing(hidden_states, self.norm, self.norm_moe_gen)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache})


@dataclass
class UniMedVLModelOutputWithPast(BaseModelOutputWithPast):
    """`gen_token_mask` `[batch, seq]` marks the latent tokens (generation expert) of `last_hidden_state`; None when all
    tokens are understanding tokens (a text decoding step); `clean_latents` `[num_latent_tokens, 64]`: the VAE latents
    before noising, when the forward noised them (`latent_noise`)."""

    gen_token_mask: torch.Tensor | None = None
    clean_latents: torch.Tensor | None = None


class UniMedVLModel(UniMedVLPreTrainedModel):
    """Embeds text, ViT images and VAE latents into one sequence and runs the Mixture-of-Transformers decoder."""

    _keep_in_fp32_modules = ["vae", "vae2llm", "time_embedder", "connector", "vision_tower.embeddings"]
    """Small, precision-critical modules: never quantized by bitsandbytes, kept in float32 when loading in float16."""

    def __init__(self, config: UniMedVLConfig):
        super().__init__(config)
        text_config, hidden = config.text_config, config.text_config.hidden_size
        self.language_model = UniMedVLTextModel._from_config(text_config)
        self.vision_tower = UniMedVLVisionModel._from_config(config.vision_config)
        self.connector = UniMedVLConnector(config)
        self.vit_pos_embed = UniMedVLPositionTable(config.vit_max_num_patch_per_side, hidden)
        self.vae = AutoencoderKL(**config.vae_config)
        self.vae2llm = nn.Linear(config.patch_latent_dim, hidden)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(256, hidden)
        self.latent_pos_embed = UniMedVLPositionTable(config.max_latent_size, hidden)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor) -> torch.Tensor:
        """ViT patch tokens `[num_patches, 3 * p * p]` → LLM-space features `[num_patches, hidden]`."""
        features = self.connector(self.vision_tower(pixel_values, image_grid_hw))
        return features + self.vit_pos_embed(grid_position_ids(image_grid_hw, self.config.vit_max_num_patch_per_side))

    def get_latent_embeddings(
        self, latents: torch.Tensor, latent_grid_hw: torch.Tensor, latent_timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Packed latent tokens `[num_tokens, 64]` (noised to `latent_timesteps` `[num_images]` ∈ [0, 1]) → `[num_tokens, hidden]`."""
        lengths = latent_grid_hw[:, 0] * latent_grid_hw[:, 1]
        timesteps = latent_timesteps.to(latents.device, torch.float32).repeat_interleave(lengths.to(latents.device))
        positions = grid_position_ids(latent_grid_hw, self.config.max_latent_size)
        return self.noised_latent_embeddings(latents, self.timestep_embeddings(timesteps), self.latent_pos_embed(positions))

    def timestep_embeddings(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Flow times `[n]` (float32, in [0, 1]) → embeddings `[n, hidden]`: sinusoidal projection, then the time MLP."""
        return self.time_embedder(cast_to_compute_dtype(self.time_proj(timesteps), self.time_embedder.linear_1))

    def noised_latent_embeddings(
        self, latents: torch.Tensor, time_embeds: torch.Tensor, position_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Latent tokens `[..., 64]` plus their timestep and grid-position embeddings (broadcast to `[..., hidden]`)."""
        return self.vae2llm(cast_to_compute_dtype(latents, self.vae2llm)) + time_embeds + position_embeds

    def encode_images(
        self,
        vae_pixel_values: list[torch.Tensor],
        sample: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE-encodes images `[3, H, W]` in [-1, 1] → packed latent tokens `[num_tokens, 64]` and their grids `[n, 2]`.

        `sample=True` draws from the posterior as the original does, `mean + exp(logvar / 2)·ε` in float32 with ε drawn
        on the VAE's device in the VAE's dtype; otherwise the posterior mean is used. `generator`: one generator for
        every image or a list with one per image, each drawing as [`generators_on`] describes; `None` draws from the
        global RNG of the VAE's device (the original).
        """
        tokens, grids = [], []
        scale, shift = self.vae.config.scaling_factor, self.vae.config.shift_factor
        generators = generators_on(generator, len(vae_pixel_values), self.vae.device) if sample else []
        for index, image in enumerate(vae_pixel_values):
            downsample = self.config.latent_downsample
            if image.shape[-2] % downsample or image.shape[-1] % downsample:
                raise ValueError(
                    f"VAE images need sides that are multiples of {downsample} pixels, got {tuple(image.shape[-2:])}; "
                    "resize them with the processor."
                )
            pixels = image[None].to(self.vae.device, self.vae.dtype)
            with vae_precision(self.vae):
                mean, logvar = self.vae.encode(pixels).latent_dist.parameters.chunk(2, dim=1)
            latent = mean
            if sample:
                noise = randn_tensor(mean.shape, generator=generators[index], device=mean.device, dtype=mean.dtype)
                latent = mean.float() + torch.exp((0.5 * logvar).float()) * noise.float()
            latent = ((latent - shift) * scale)[0].float()
            tokens.append(patchify_latents(latent, self.config.latent_patch_size))
            grids.append([latent.shape[1] // self.config.latent_patch_size, latent.shape[2] // self.config.latent_patch_size])
        return torch.cat(tokens), torch.tensor(grids, dtype=torch.long, device=tokens[0].device)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        latent_grid_hw: torch.Tensor | None = None,
        latent_timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings `[batch, seq, hidden]` with ViT features and latent embeddings scattered at their placeholders."""
        embeds = self.get_input_embeddings()(input_ids)
        image_slots = input_ids == self.config.image_token_id
        if image_slots.any():
            if pixel_values is None or image_grid_hw is None:
                raise ValueError("input_ids hold image placeholders but no `pixel_values` / `image_grid_hw` were given.")
            features = self.get_image_features(pixel_values, image_grid_hw)
            _check_placeholder_count("image", int(image_slots.sum()), features.shape[0])
            embeds = embeds.masked_scatter(image_slots[..., None], features.to(embeds.dtype))
        latent_slots = input_ids == self.config.latent_token_id
        if latent_slots.any():
            if latents is None or latent_grid_hw is None:
                raise ValueError("input_ids hold latent placeholders but no `latents` / `latent_grid_hw` were given.")
            if latent_timesteps is None:
                latent_timesteps = torch.zeros(latent_grid_hw.shape[0], device=latents.device)
            latent_embeds = self.get_latent_embeddings(latents, latent_grid_hw, latent_timesteps)
            _check_placeholder_count("latent", int(latent_slots.sum()), latent_embeds.shape[0])
            embeds = embeds.masked_scatter(latent_slots[..., None], latent_embeds.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        latent_grid_hw: torch.Tensor | None = None,
        latent_timesteps: torch.Tensor | None = None,
        vae_pixel_values: list[torch.Tensor] | None = None,
        latent_noise: torch.Tensor | None = None,
        vae_sample: bool = False,
        sample_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        update_cache: bool = True,
        **kwargs,
    ) -> UniMedVLModelOutputWithPast:
        """Runs one chunk of `input_ids` `[batch, seq]`, appended to `cache` if given.

        `input_ids` always describe the chunk's structure (placeholders for image and latent tokens); `inputs_embeds`
        may replace their embeddings. Images come as ViT patches (`pixel_values` `[num_patches, 3*p*p]`,
        `image_grid_hw`), as VAE pixels (`vae_pixel_values`, encoded clean with the posterior mean) or as latent tokens
        (`latents` `[num_tokens, 64]`, `latent_grid_hw`, `latent_timesteps`; a timestep > 0 makes a noise block).
        `attention_mask` `[batch, past + seq]` marks real tokens (or is the mask `generate` prepared for a decoding
        step). `update_cache=False` attends to the cache without writing the chunk into it. `position_ids` are required
        after a non-empty cache. `sample_ids` `[batch, seq]` mark the samples packed into one row (training without a
        cache): attention stays inside a sample; pass each sample's own `position_ids`.

        Training passes `vae_pixel_values` with `latent_timesteps` `[num_images]` and `latent_noise` `[num_tokens, 64]`:
        the images are encoded here (posterior sample with `vae_sample=True`, else its mean) and noised to
        `(1 − t)·x_0 + t·ε`, so that sharded VAE weights (FSDP, ZeRO-3) are only used inside the forward; the clean
        latents come back as `clean_latents` for the flow-matching target `ε − x_0`.

        A text decoding step (one token per row after a cache, with `position_ids` and no image inputs) takes a path
        without data-dependent control flow or host synchronisation (see `_text_step`), so that it compiles as one
        graph with a static cache.
        """
        cache = _cache_argument(cache, kwargs)
        if isinstance(attention_mask, dict):  # `generate`'s masks keyed by layer type: every layer is full attention
            attention_mask = attention_mask["full_attention"]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        image_inputs = (pixel_values, latents, vae_pixel_values)
        if input_ids.shape[1] == 1 and cache is not None and update_cache and position_ids is not None and all(
            inputs is None for inputs in image_inputs
        ):
            return self._text_step(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, **kwargs)
        past_length = int(cache.get_seq_length()) if cache is not None else 0
        if sample_ids is not None and past_length > 0:
            raise ValueError("`sample_ids` (packed samples) cannot be combined with a non-empty cache.")
        clean_latents = None
        if vae_pixel_values is not None and latents is None and (input_ids == self.config.latent_token_id).any():
            latents, latent_grid_hw = self.encode_images(vae_pixel_values, sample=vae_sample)
            if latent_noise is not None:
                if latent_timesteps is None:
                    raise ValueError("`latent_noise` needs the per-image `latent_timesteps` to noise the latents to.")
                if latent_noise.shape != latents.shape:
                    raise ValueError(f"`latent_noise` has shape {tuple(latent_noise.shape)}, the latents {tuple(latents.shape)}.")
                clean_latents = latents
                latents = noise_latents(clean_latents, latent_noise, latent_timesteps, latent_grid_hw.prod(-1))
        noise = None
        if latent_timesteps is not None and (latent_timesteps > 0).any():
            noise = torch.zeros_like(input_ids, dtype=torch.bool)
            lengths = latent_grid_hw[:, 0] * latent_grid_hw[:, 1]
            per_token = (latent_timesteps > 0).to(input_ids.device).repeat_interleave(lengths.to(input_ids.device))
            noise[input_ids == self.config.latent_token_id] = per_token
        chunk_mask = attention_mask[:, past_length:] if attention_mask is not None else None
        structure = sequence_structure(input_ids, self.config, chunk_mask, noise)
        if position_ids is None:
            if past_length > 0:
                raise ValueError("`position_ids` are required when appending to a non-empty cache.")
            position_ids = structure.position_ids
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(
                input_ids, pixel_values, image_grid_hw, latents, latent_grid_hw, latent_timesteps
            )
        attended = cache if update_cache or cache is None else ReadOnlyContextCache.from_cache(cache)
        kv_length = attended.get_mask_sizes(input_ids.shape[1], 0)[0] if attended is not None else input_ids.shape[1]
        mask_function = chunk_mask_function(structure.block_ids, structure.noise_mask, past_length, sample_ids)
        mask = chunk_attention_mask(
            self.config.text_config, inputs_embeds, attention_mask, past_length, kv_length, mask_function
        )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            gen_token_mask=structure.gen_token_mask,
            cache=attended,
            latent_block_mask=structure.latent_block_mask,
            **kwargs,
        )
        return UniMedVLModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            gen_token_mask=structure.gen_token_mask,
            clean_latents=clean_latents,
            **{CACHE_FIELD: cache if use_cache or not update_cache else None},
        )

    def _text_step(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, **kwargs):
        """One text token per row after `cache`: embedded without looking for placeholders, routed to the
        understanding expert, under the causal mask of `masking_utils` (which reads a static cache's length as a
        tensor, or takes the mask `generate` prepared). No data-dependent Python control flow, no host
        synchronisation."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        text_config = self.config.text_config
        mask = create_causal_mask(
            text_config, inputs_embeds, attention_mask, cache, position_ids, allow_is_causal_skip=False
        )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, cache=cache, **kwargs
        )
        return UniMedVLModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state, **{CACHE_FIELD: cache if use_cache else None}
        )


def _cache_argument(cache: Cache | None, kwargs: dict) -> Cache | None:
    """The cache passed as `cache` (transformers ≥ 5.24) or as `past_key_values` (earlier releases, older callers)."""
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def _check_placeholder_count(kind: str, placeholders: int, features: int) -> None:
    if placeholders != features:
        raise ValueError(
            f"input_ids hold {placeholders} {kind} placeholder tokens but the {kind} inputs give {features} tokens; "
            "build the inputs with UniMedVLProcessor so that both agree."
        )


def noise_latents(clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation `x_t = (1 − t)·x_0 + t·ε` of packed latent tokens `[num_tokens, 64]` of images with
    `lengths` `[num_images]` tokens each and per-image `timesteps` `[num_images]` (t = 0 keeps a clean image)."""
    t = timesteps.to(clean.device, clean.dtype).repeat_interleave(lengths.to(clean.device))[:, None]
    return (1 - t) * clean + t * noise.to(clean.device, clean.dtype)


def patchify_latents(latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`[C, p*h, p*w]` → `[h*w, p*p*C]` tokens, each in (patch row, patch column, channel) order."""
    channels, height, width = latent.shape
    latent = latent.reshape(channels, height // patch_size, patch_size, width // patch_size, patch_size)
    return torch.einsum("chpwq->hwpqc", latent).reshape(-1, patch_size * patch_size * channels)


def unpatchify_latents(tokens: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """`[..., h*w, p*p*C]` tokens of an `h × w` grid → latents `[..., C, p*h, p*w]`."""
    lead = tokens.shape[:-2]
    channels = tokens.shape[-1] // patch_size**2
    tokens = tokens.reshape(*lead, height, width, patch_size, patch_size, channels)
    tokens = torch.einsum("...hwpqc->...chpwq", tokens)
    return tokens.reshape(*lead, channels, height * patch_size, width * patch_size)


# ----------------------------------------------------------------------------------------------------------------------
# Conditional generation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class UniMedVLCausalLMOutputWithPast(CausalLMOutputWithPast):
    """transformers' causal-LM output (`loss`, `logits` `[batch, seq, vocab]`, the cache, `hidden_states`: the last
    layer's `[batch, seq, hidden]`) plus `velocity` `[num_latent_tokens, 64]`: the flow prediction at every latent
    token, and `clean_latents` `[num_latent_tokens, 64]`: the latents before noising (training with `latent_noise`)."""

    velocity: torch.Tensor | None = None
    clean_latents: torch.Tensor | None = None


@dataclass
class UniMedVLImageGenerationOutput(ModelOutput):
    """`images`: `[batch, 3, H, W]` in [-1, 1] in the VAE's dtype (or `None` for latents only); `latents`: final tokens
    `[batch, h*w, 64]`; both are lists with one tensor per row when the rows have different sizes. `text`: the
    planning text of each row (think mode), else `None`."""

    images: torch.Tensor | list[torch.Tensor] | None = None
    latents: torch.Tensor | list[torch.Tensor] | None = None
    text: list[str] | None = None


@dataclass
class NoisyBlock:
    """What a denoising step feeds the decoder for its `rows` guidance rows, built once per generation: read-only
    views of the prefilled contexts (`cache`), the rows grouped by context padding (attention without a mask), the
    routing of the block's `<|vision_start|>` / `<|vision_end|>` tokens to the understanding expert and of its latent
    tokens to the generation expert, RoPE `(cos, sin)` `[rows, h·w + 2, head_dim]`, the float32 q/k-norm mask of a latent block
    `[rows, h·w + 2]`, the embeddings of the two delimiters `[rows, 1, hidden]` and the latent grid's position
    embeddings `[h·w, hidden]`."""

    cache: ReadOnlyContextCache
    attention_mask: KeyPaddingGroups
    routing: TokenRouting
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    latent_block_mask: torch.Tensor
    start_embeds: torch.Tensor
    end_embeds: torch.Tensor
    position_embeds: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the step reads from this block."""
        context = [t for layer in self.cache.layers for t in (layer.keys, layer.values) if t is not None]
        fixed = [self.latent_block_mask, self.start_embeds, self.end_embeds, self.position_embeds]
        return context + [self.routing.und_index, self.routing.gen_index, *self.position_embeddings, *fixed]


@dataclass
class DenoisingPlan:
    """The request-only inputs of every denoising step of one generation: the [`NoisyBlock`] per number of evaluated
    rows, and per step its timestep embedding `[hidden]` and `(σ, σ_next)` (0-dim float32)."""

    blocks: dict[int, NoisyBlock]
    time_embeds: list[torch.Tensor]
    sigmas: list[tuple[torch.Tensor, torch.Tensor]]


class UniMedVLForConditionalGeneration(UniMedVLPreTrainedModel, GenerationMixin):
    """UniMedVL with the language-model head (understanding) and the flow head `llm2vae` (image generation)."""

    output_modalities = ("image", "text")
    _tied_weights_keys = {}
    _keep_in_fp32_modules = ["lm_head", "llm2vae"] + [f"model.{name}" for name in UniMedVLModel._keep_in_fp32_modules]
    """Never quantized by bitsandbytes (names match from the start of a module path), float32 under float16 loading."""
    accepts_loss_kwargs = False

    def __init__(self, config: UniMedVLConfig):
        super().__init__(config)
        self.model = UniMedVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.llm2vae = nn.Linear(config.text_config.hidden_size, config.patch_latent_dim)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    @property
    def vae(self) -> AutoencoderKL:
        return self.model.vae

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        latent_grid_hw: torch.Tensor | None = None,
        latent_timesteps: torch.Tensor | None = None,
        vae_pixel_values: list[torch.Tensor] | None = None,
        latent_noise: torch.Tensor | None = None,
        vae_sample: bool = False,
        sample_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> UniMedVLCausalLMOutputWithPast:
        """See [`UniMedVLModel.forward`]. `labels` `[batch, seq]` (-100 = ignored) give a next-token cross-entropy."""
        cache = _cache_argument(cache, kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            image_grid_hw=image_grid_hw,
            latents=latents,
            latent_grid_hw=latent_grid_hw,
            latent_timesteps=latent_timesteps,
            vae_pixel_values=vae_pixel_values,
            latent_noise=latent_noise,
            vae_sample=vae_sample,
            sample_ids=sample_ids,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        velocity = None
        if outputs.gen_token_mask is not None and outputs.gen_token_mask.any():
            velocity = self.llm2vae(cast_to_compute_dtype(hidden_states[outputs.gen_token_mask], self.llm2vae))
        kept = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        logits = self.lm_head(cast_to_compute_dtype(kept, self.lm_head))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        return UniMedVLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            velocity=velocity,
            clean_latents=outputs.clean_latents,
            hidden_states=hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )

    # ------------------------------------------------------------------ text generation (GenerationMixin hooks)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        input_ids = model_kwargs.get("input_ids", inputs_tensor)
        if input_ids is None or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError("UniMedVL generates from `input_ids` (built by UniMedVLProcessor), not from embeddings.")
        return sequence_structure(input_ids, self.config, model_kwargs.get("attention_mask")).position_ids

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask=None, **kwargs):
        """Masks that `generate` prepares outside the forward when the cache is compileable (a static cache): a
        decoding step gets transformers' causal masks (sized for the static cache, so the compiled step keeps its
        shapes); a prefill keeps the 2-D padding mask, from which the forward builds its image-block mask."""
        if inputs_embeds.shape[1] != 1 or kwargs.get("is_first_iteration"):
            return attention_mask
        return create_masks_for_generate(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, is_first_iteration=False, **kwargs):
        """The library's preparation (it receives the cache under the name of the installed transformers); image
        inputs are dropped after the prefill."""
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("vae_pixel_values", "latents", "latent_grid_hw", "latent_timesteps", "image_grid_hw"):
                kwargs.pop(key, None)
        return super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)

    @torch.no_grad()
    def generate(self, inputs=None, generation_mode: str = "text", **kwargs):
        """`generation_mode="text"`: [`GenerationMixin.generate`] (greedy, sampling, …; stops at `<|im_end|>`);
        sampling draws from the full softmax at `temperature` as the original does (no top-k unless one is given).
        `generation_mode="image"`: [`generate_image`]."""
        if generation_mode == "text":
            input_ids = inputs if inputs is not None else kwargs.get("input_ids")
            if input_ids is not None and input_ids.dim() == 2:
                next_position = sequence_structure(input_ids, self.config, kwargs.get("attention_mask")).next_position
                self._warn_past_position_limit(next_position, self._new_token_count(input_ids, kwargs))
            return super().generate(inputs, **self._full_softmax_sampling(kwargs))
        if generation_mode == "image":
            if inputs is not None:
                kwargs["input_ids"] = inputs
            return self.generate_image(**kwargs)
        raise ValueError(f"Unsupported generation_mode {generation_mode!r}: UniMedVL generates 'text' or 'image'.")

    def _new_token_count(self, input_ids: torch.Tensor | None, kwargs: dict) -> int:
        """How many tokens a text `generate` call may add: `max_new_tokens`, else `max_length` minus the prompt, from
        the arguments, a given `generation_config` or the model's."""
        configs = [config for config in (kwargs.get("generation_config"), self.generation_config) if config is not None]
        max_new_tokens = kwargs.get("max_new_tokens", next((c.max_new_tokens for c in configs if c.max_new_tokens), None))
        if max_new_tokens is not None:
            return max_new_tokens
        max_length = kwargs.get("max_length", next((c.max_length for c in configs if c.max_length), 0))
        return max(max_length - (input_ids.shape[1] if input_ids is not None else 0), 0)

    def _warn_past_position_limit(self, next_position: torch.Tensor, new_positions: int) -> None:
        """Warns when contexts whose next RoPE position is `next_position` `[rows]` (an image block takes one
        position) plus `new_positions` go past the text model's `max_position_embeddings`: beyond it, RoPE
        extrapolates and outputs degrade. Reads one value back to the host, once per call."""
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        if limit is None:
            return
        last = int(next_position.max()) + new_positions - 1
        if last >= limit:
            logger.warning(
                f"This request reaches RoPE position {last}, past the model's max_position_embeddings ({limit}): the "
                f"context uses {last - new_positions + 1} positions and up to {new_positions} new ones are asked for. "
                "Outputs that far are extrapolated and may degrade; shorten the prompt or lower max_new_tokens."
            )

    def _full_softmax_sampling(self, kwargs: dict) -> dict:
        """`generate` keywords in which sampling keeps the whole vocabulary, as the original's `multinomial(softmax(
        logits / T))`: transformers' default top-k of 50 becomes 0 (off) unless a top-k is given as an argument, in a
        given `generation_config` or in the model's."""
        given = kwargs.get("generation_config")
        configs = [config for config in (given, self.generation_config) if config is not None]
        if kwargs.get("top_k") is not None or any(config.top_k is not None for config in configs):
            return kwargs
        do_sample = kwargs.get("do_sample")
        if do_sample is None:
            do_sample = next((config.do_sample for config in configs if config.do_sample is not None), False)
        if not do_sample:
            return kwargs
        if given is None:
            return {**kwargs, "top_k": 0}
        given = copy.deepcopy(given)
        given.top_k = 0
        return {**kwargs, "generation_config": given}

    @torch.no_grad()
    def generate_text_segment(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        tokenizer=None,
        max_think_token_n: int = 1000,
        do_sample: bool = False,
        temperature: float = 0.3,
        **image_inputs,
    ) -> list[str]:
        """The original's text step (`InterleaveInferencer.gen_text`): one text segment per row of `input_ids`
        `[batch, seq]`, which must end with the generation prompt `<|im_start|>` (the processor's text mode).

        Decoding is greedy, or samples from the full softmax at `temperature` (`do_sample`), for at most
        `max_think_token_n` steps, and stops at `<|im_end|>`; as in the original, the token chosen at the last step is
        not kept, so a segment holds at most `max_think_token_n − 1` tokens. The kept tokens are decoded with their
        special tokens by `tokenizer` and the text between the first `<|im_start|>` and the first `<|im_end|>` is
        returned, as the original's string handling does. `image_inputs`: `pixel_values` / `image_grid_hw`, and
        `vae_pixel_values` or already encoded `latents` / `latent_grid_hw` for VAE blocks. Think mode's planning text,
        the editing flow's answer and `inference_ver=1` answers are such segments.
        """
        config = self.config
        if tokenizer is None:
            raise ValueError("`tokenizer` is required to decode the text segment (pass the processor's tokenizer).")
        if isinstance(max_think_token_n, bool) or not isinstance(max_think_token_n, int) or max_think_token_n < 1:
            raise ValueError(f"`max_think_token_n` must be a positive integer, got {max_think_token_n!r}.")
        if do_sample:
            check_finite_number("temperature", temperature, low=0.0, open_low=True)
        if not bool((input_ids[:, -1] == config.bos_token_id).all()):
            raise ValueError("A text segment is decoded after the generation prompt: `input_ids` must end with <|im_start|>.")
        sampling = {"do_sample": True, "temperature": float(temperature)} if do_sample else {"do_sample": False}
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        generated = self.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_think_token_n,
            eos_token_id=config.eos_token_id,
            pad_token_id=pad,
            **sampling,
            **image_inputs,
        )
        bos_text, eos_text = tokenizer.convert_ids_to_tokens([config.bos_token_id, config.eos_token_id])
        texts = []
        for row in generated[:, input_ids.shape[1] :].tolist():
            kept = row[: max_think_token_n - 1]
            if config.eos_token_id in kept:
                kept = kept[: kept.index(config.eos_token_id)]
            decoded = tokenizer.decode([config.bos_token_id] + kept, skip_special_tokens=False)
            texts.append(decoded.split(eos_text)[0].split(bos_text)[1])
        return texts

    # ------------------------------------------------------------------ image generation (rectified flow)

    @torch.no_grad()
    def generate_image(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        vae_pixel_values: list[torch.Tensor] | None = None,
        image_latents: tuple[torch.Tensor, torch.Tensor] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timestep_shift: float | None = None,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 1.5,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_type: str = "global",
        cfg_renorm_min: float = 0.0,
        cfg_text_mask: torch.Tensor | None = None,
        cfg_img_mask: torch.Tensor | None = None,
        latents: torch.Tensor | list[torch.Tensor] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        vae_encode: str = "sample",
        think: bool = False,
        tokenizer=None,
        max_think_token_n: int = 1000,
        text_do_sample: bool = False,
        text_temperature: float = 0.3,
        decode: bool = True,
        callback_on_step_end: Callable | None = None,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        compile_config: CompileConfig | None = None,
        **kwargs,
    ) -> UniMedVLImageGenerationOutput:
        """Generates one image per row of `input_ids` `[batch, seq]` by rectified flow with classifier-free guidance,
        as the original's `InterleaveInferencer.interleave_inference` does for any interleaving of text and images.

        Contexts: the full context (prompt, and every input image as a clean VAE block plus a ViT block); the
        text-guidance context, which is the context as it stood before the last text segment or right after the last
        image, whichever came later (so with an image last, text guidance changes nothing); and the image-guidance
        context, every text segment without the images (for text-to-image: the full context). The VAE blocks take
        `vae_pixel_values` (encoded here) or already encoded `image_latents` (packed tokens `[n, 64]`, grids `[m, 2]`,
        from `model.model.encode_images`; all rows share one size then). `cfg_text_mask` /
        `cfg_img_mask` `[batch, seq]` (bool) may select other tokens of `input_ids` for them. The three contexts are
        prefilled once; each of the `num_inference_steps − 1` Euler steps runs the noisy `[<|vision_start|>, h·w
        latents, <|vision_end|>]` block against them without writing it; a guidance branch runs only where its scale
        is above 1 and `cfg_interval[0] < σ ≤ cfg_interval[1]` (float32 comparison). Guidance, renormalisation
        (`cfg_renorm_type`, `cfg_renorm_min`), the Euler step and their precision are `sampling_unimedvl`'s.

        Think mode (`think=True`, with the processor's `think=True` system prompt): each row's planning text is first
        generated on the full context (`generate_text_segment` with `max_think_token_n`, `text_do_sample`,
        `text_temperature`), decoded by `tokenizer`, re-tokenized from the decoded string and appended to the full
        context only as a new text segment; it comes back as `text`.

        Sizes: `height` and `width` (both or neither); by default each row keeps the size of its first input image's
        VAE block, and a row without one gets the largest size of the latent table (1024 px). Rows of different sizes
        are generated in groups of equal size; `images` and `latents` are then lists with one tensor per row.

        Randomness (details in `sampling_unimedvl`): `generator` is one generator or one per row; a row's VAE posterior
        samples (`vae_encode="sample"`, the original; `"mean"` for the posterior mean) and then its initial noise
        (CPU, float32) come from its generator, so a row of a batch equals the single run with the same generator.
        `latents` `[batch, h·w, 64]` replace the initial noise. The schedule is BAGEL's, `linspace(1, 0,
        num_inference_steps)` shifted by `timestep_shift` (default 3.0), read from `scheduler` (a
        `FlowMatchEulerDiscreteScheduler`, created if not given; a given `timestep_shift` is set on it).
        `callback_on_step_end(step, timestep, latents)` may return new latents (same shape, finite; None keeps them).

        Speed: the request decides everything but the latents, so positions, routing, masks, timestep embeddings and
        which guidance branches each step evaluates are computed once ([`denoising_plan`]); each step
        ([`denoising_step`]) then runs without host synchronisation. `compile_config` (a transformers `CompileConfig`)
        compiles that step with `torch.compile(**compile_config.to_dict())`, e.g. `CompileConfig(fullgraph=True,
        mode="reduce-overhead")` for CUDA graphs on a GPU; at most three graphs (one per number of evaluated
        branches) are built per image size and batch.

        Returns `images` in [-1, 1] `[batch, 3, height, width]` in the VAE's dtype (`decode=False`: `None`), the final
        latent tokens `[batch, h·w, 64]` (float32) and the planning texts (think mode, else `None`).
        """
        if kwargs:
            raise TypeError(f"generate_image() got unexpected arguments: {sorted(kwargs)}")
        if compile_config is not None and not isinstance(compile_config, CompileConfig):
            raise TypeError(f"`compile_config` must be a transformers CompileConfig, got {type(compile_config).__name__}.")
        check_sampler_arguments(
            num_inference_steps, timestep_shift, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min
        )
        if vae_encode not in ("sample", "mean"):
            raise ValueError(f"`vae_encode` must be 'sample' or 'mean', got {vae_encode!r}.")
        if think and tokenizer is None:
            raise ValueError("think=True needs `tokenizer` (the processor's) to re-tokenize the planning text.")
        if think and text_do_sample:
            check_finite_number("text_temperature", text_temperature, low=0.0, open_low=True)
        if scheduler is not None and scheduler.config.get("stochastic_sampling", False):
            raise ValueError("The original sampler takes deterministic Euler steps; `stochastic_sampling` is not supported.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_latents is not None and vae_pixel_values:
            raise ValueError("Give the VAE images either as `vae_pixel_values` or as encoded `image_latents`, not both.")
        if cfg_text_mask is None or cfg_img_mask is None:
            text_keep, image_keep = cfg_context_masks(input_ids, attention_mask, self.config)
            cfg_text_mask = text_keep if cfg_text_mask is None else cfg_text_mask.bool()
            cfg_img_mask = image_keep if cfg_img_mask is None else cfg_img_mask.bool()
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_grid_hw": image_grid_hw,
            "vae_pixel_values": vae_pixel_values,
            "image_latents": image_latents,
            "cfg_text_mask": cfg_text_mask,
            "cfg_img_mask": cfg_img_mask,
        }
        settings = {
            "num_inference_steps": num_inference_steps,
            "timestep_shift": timestep_shift,
            "cfg_text_scale": cfg_text_scale,
            "cfg_img_scale": cfg_img_scale,
            "cfg_interval": tuple(cfg_interval),
            "cfg_renorm_type": cfg_renorm_type,
            "cfg_renorm_min": cfg_renorm_min,
            "vae_encode": vae_encode,
            "think": think,
            "tokenizer": tokenizer,
            "max_think_token_n": max_think_token_n,
            "text_do_sample": text_do_sample,
            "text_temperature": text_temperature,
            "decode": decode,
            "callback_on_step_end": callback_on_step_end,
            "scheduler": scheduler,
            "compile_config": compile_config,
        }
        sizes = self.output_sizes(height, width, input_ids, vae_pixel_values)
        if image_latents is not None and height is None:
            sizes = [tuple(int(side) * self.config.latent_downsample for side in image_latents[1][0].tolist())] * len(sizes)
        if len(set(sizes)) == 1:
            if isinstance(latents, (list, tuple)):
                latents = torch.stack(list(latents))
            return self._generate_images(inputs, sizes[0], latents, generator, **settings)
        return self._generate_images_by_size(inputs, sizes, latents, generator, settings)

    def output_sizes(
        self,
        height: int | None,
        width: int | None,
        input_ids: torch.Tensor,
        vae_pixel_values: list[torch.Tensor] | None = None,
    ) -> list[tuple[int, int]]:
        """Each row's `(height, width)`: as given (both or neither), else the row's first input image's VAE size, else
        the largest size of the latent table; checked against the latent grid (multiples of `latent_downsample` up to
        `max_latent_size` latents per side)."""
        downsample, batch = self.config.latent_downsample, input_ids.shape[0]
        limit = self.config.max_latent_size * downsample
        if (height is None) != (width is None):
            given, missing = ("height", "width") if width is None else ("width", "height")
            raise ValueError(f"`{given}` was given without `{missing}`: give both (multiples of {downsample}) or neither.")
        if height is not None:
            sizes = [(height, width)] * batch
        else:
            first_images = _first_block_per_row(input_ids, self.config.latent_token_id, self.config)
            sizes = [
                tuple(vae_pixel_values[index].shape[-2:]) if index is not None and vae_pixel_values else (limit, limit)
                for index in first_images
            ]
        for size in set(sizes):
            if any(isinstance(side, bool) or not isinstance(side, int) for side in size) or any(
                side % downsample or not 0 < side <= limit for side in size
            ):
                raise ValueError(
                    f"height and width must be positive multiples of {downsample} up to {limit} pixels, "
                    f"got {size[0]}x{size[1]}."
                )
        return [(int(h), int(w)) for h, w in sizes]

    def _generate_images_by_size(self, inputs: dict, sizes: list, latents, generator, settings: dict):
        """Rows of different output sizes, one `_generate_images` call per size (rows in their order within each);
        a single `generator` continues its stream from one group to the next."""
        batch = len(sizes)
        if latents is not None and not isinstance(latents, (list, tuple)):
            raise ValueError("Rows of different sizes take `latents` as a list with one `[h·w, 64]` tensor per row.")
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"Got {len(generator)} generators for {batch} rows; give one generator, or one per row.")
        images, final_latents, texts = [None] * batch, [None] * batch, [None] * batch
        for size in dict.fromkeys(sizes):
            rows = [row for row in range(batch) if sizes[row] == size]
            group_generator = [generator[row] for row in rows] if isinstance(generator, (list, tuple)) else generator
            group_latents = torch.stack([latents[row] for row in rows]) if latents is not None else None
            output = self._generate_images(self._select_rows(inputs, rows), size, group_latents, group_generator, **settings)
            for position, row in enumerate(rows):
                final_latents[row] = output.latents[position]
                if output.images is not None:
                    images[row] = output.images[position]
                if output.text is not None:
                    texts[row] = output.text[position]
        return UniMedVLImageGenerationOutput(
            images=images if settings["decode"] else None,
            latents=final_latents,
            text=texts if settings["think"] else None,
        )

    def _select_rows(self, inputs: dict, rows: list[int]) -> dict:
        """The generation inputs of the batch rows `rows`: token rows, and the ViT patches / VAE images of their images."""
        config, input_ids = self.config, inputs["input_ids"]
        selected = {key: inputs[key][rows] for key in ("input_ids", "attention_mask", "cfg_text_mask", "cfg_img_mask")}
        vit_images = _images_of_rows(_blocks_per_row(input_ids, config.image_token_id, config), rows)
        if inputs["pixel_values"] is not None and vit_images:
            grids = inputs["image_grid_hw"]
            offsets = [0] + (grids[:, 0] * grids[:, 1]).cumsum(0).tolist()
            patches = [inputs["pixel_values"][offsets[i] : offsets[i + 1]] for i in vit_images]
            selected["pixel_values"], selected["image_grid_hw"] = torch.cat(patches), grids[vit_images]
        else:
            selected["pixel_values"] = selected["image_grid_hw"] = None
        vae_images = _images_of_rows(_blocks_per_row(input_ids, config.latent_token_id, config), rows)
        vae_pixels = inputs["vae_pixel_values"]
        selected["vae_pixel_values"] = [vae_pixels[i] for i in vae_images] if vae_pixels and vae_images else None
        selected["image_latents"] = None  # encoded latents come with one size for all rows
        return selected

    def _generate_images(
        self,
        inputs: dict,
        size: tuple[int, int],
        latents: torch.Tensor | None,
        generator,
        num_inference_steps: int,
        timestep_shift: float | None,
        cfg_text_scale: float,
        cfg_img_scale: float,
        cfg_interval: tuple[float, float],
        cfg_renorm_type: str,
        cfg_renorm_min: float,
        vae_encode: str,
        think: bool,
        tokenizer,
        max_think_token_n: int,
        text_do_sample: bool,
        text_temperature: float,
        decode: bool,
        callback_on_step_end: Callable | None,
        scheduler: FlowMatchEulerDiscreteScheduler | None,
        compile_config: CompileConfig | None,
    ) -> UniMedVLImageGenerationOutput:
        """[`generate_image`] for rows that share one output `size`."""
        config, device = self.config, self.device
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        text_keep, image_keep = inputs["cfg_text_mask"], inputs["cfg_img_mask"]
        batch = input_ids.shape[0]
        image_inputs = {"pixel_values": inputs["pixel_values"], "image_grid_hw": inputs["image_grid_hw"]}
        if inputs["image_latents"] is not None:
            image_inputs["latents"], image_inputs["latent_grid_hw"] = inputs["image_latents"]
        elif inputs["vae_pixel_values"]:
            image_generators = generator
            if isinstance(generator, (list, tuple)):
                per_row = _blocks_per_row(input_ids, config.latent_token_id, config)
                image_generators = [generator[row] for row, count in enumerate(per_row) for _ in range(count)]
            image_inputs["latents"], image_inputs["latent_grid_hw"] = self.model.encode_images(
                inputs["vae_pixel_values"], sample=vae_encode == "sample", generator=image_generators
            )
        texts = None
        if think:
            texts = self.generate_text_segment(
                torch.cat([input_ids, input_ids.new_full((batch, 1), config.bos_token_id)], dim=1),
                torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1),
                tokenizer,
                max_think_token_n,
                text_do_sample,
                text_temperature,
                **{key: value for key, value in image_inputs.items() if value is not None},
            )
            segments = [[config.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), config.eos_token_id] for text in texts]
            input_ids, attention_mask, text_keep, image_keep = _append_to_full_context(
                segments, input_ids, attention_mask, text_keep, image_keep, config.pad_token_id or 0
            )
        grid_h, grid_w = size[0] // config.latent_downsample, size[1] // config.latent_downsample
        shape = (batch, grid_h * grid_w, config.patch_latent_dim)
        latents = initial_noise(shape, generator) if latents is None else latents.reshape(shape)
        latents = latents.to(device, torch.float32)

        embeds = self.model.embed_inputs(input_ids, **image_inputs)
        context = self._prefill_cfg_contexts(input_ids, attention_mask, embeds, text_keep, image_keep)
        if scheduler is None:
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0 if timestep_shift is None else timestep_shift)
        elif timestep_shift is not None:
            scheduler.set_shift(timestep_shift)
        schedule = denoising_schedule(
            scheduler, num_inference_steps, cfg_interval, cfg_text_scale > 1.0, cfg_img_scale > 1.0, device
        )
        plan = self.denoising_plan(context, grid_h, grid_w, schedule)
        guidance = CfgGuidance(cfg_text_scale, cfg_img_scale, cfg_renorm_type, cfg_renorm_min)
        step_function = self.denoising_step if compile_config is None else self._compiled_denoising_step(compile_config)
        for step, rows in enumerate(schedule.branches):
            if compile_config is not None:
                torch.compiler.cudagraph_mark_step_begin()
            latents = step_function(plan.blocks[rows * batch], latents, plan.time_embeds[step], *plan.sigmas[step], guidance)
            if compile_config is not None:
                latents = latents.clone()  # a CUDA-graph output is overwritten by the next replay
            if callback_on_step_end is not None:
                latents = check_callback_latents(callback_on_step_end(step, schedule.timesteps[step], latents), latents, step)
        images = self.decode_latents(latents, grid_h, grid_w) if decode else None
        return UniMedVLImageGenerationOutput(images=images, latents=latents, text=texts)

    def _prefill_cfg_contexts(self, input_ids, attention_mask, embeds, text_keep, image_keep) -> dict:
        """Prefills the [full, text-guidance, image-guidance] contexts (tokens of `input_ids` selected by the padding
        mask and the two keep masks, all `[batch, seq]`) as one left-padded batch of `3 * batch` rows."""
        config = self.config
        real = attention_mask.bool()
        if not real.any(dim=1).all():
            raise ValueError("Every prompt needs a text segment or an image; got an empty prompt.")
        selections = [real, real & text_keep, real & image_keep]
        rows = [_gather_left_padded(input_ids, embeds, keep) for keep in selections]
        length = max(ids.shape[1] for ids, _, _ in rows)
        ids = torch.cat([nn.functional.pad(r[0], (length - r[0].shape[1], 0), value=config.pad_token_id or 0) for r in rows])
        emb = torch.cat([nn.functional.pad(r[1], (0, 0, length - r[1].shape[1], 0)) for r in rows])
        mask = torch.cat([nn.functional.pad(r[2], (length - r[2].shape[1], 0)) for r in rows])
        next_position = sequence_structure(ids, config, mask).next_position
        self._warn_past_position_limit(next_position, 1)  # the noisy block takes one position
        cache = DynamicCache(config=config.text_config)
        if length > 0:
            self.model(input_ids=ids, attention_mask=mask, inputs_embeds=emb, cache=cache, use_cache=True)
        batch = input_ids.shape[0]
        return {"cache": cache, "attention_mask": mask, "next_position": next_position, "batch": batch}

    def denoising_plan(self, context: dict, grid_h: int, grid_w: int, schedule: DenoisingSchedule) -> "DenoisingPlan":
        """Everything the denoising steps of one generation need that does not depend on the noisy latents, computed
        once: per number of evaluated rows, the [`NoisyBlock`] against read-only views of the prefilled `context`
        (from `_prefill_cfg_contexts`); per step, the timestep embedding `[hidden]` and `(σ, σ_next)`."""
        model, config = self.model, self.config
        device, batch = context["attention_mask"].device, context["batch"]
        block_ids = torch.tensor([config.vision_start_token_id, config.vision_end_token_id], device=device)
        start, end = model.get_input_embeddings()(block_ids)[:, None]
        grid = torch.tensor([[grid_h, grid_w]], device=device)
        position_embeds = model.latent_pos_embed(grid_position_ids(grid, config.max_latent_size))
        blocks = {
            rows * batch: self._noisy_block(context, rows * batch, start, end, position_embeds)
            for rows in sorted(set(schedule.branches))
        }
        time_embeds = model.timestep_embeddings(schedule.sigmas[:-1])
        sigmas = schedule.sigmas
        return DenoisingPlan(
            blocks=blocks,
            time_embeds=[embed.clone() for embed in time_embeds],
            sigmas=[(sigmas[step].clone(), sigmas[step + 1].clone()) for step in range(len(schedule.branches))],
        )

    def _noisy_block(self, context: dict, rows: int, start, end, position_embeds) -> "NoisyBlock":
        """The noisy block `[<|vision_start|>, h·w latents, <|vision_end|>]` of the first `rows` guidance rows: all its
        tokens at each row's next RoPE position, attending to the row's context (padding hidden) and to itself."""
        config, text_model = self.config, self.model.language_model
        num_tokens = position_embeds.shape[0]
        length = num_tokens + 2
        padding = context["attention_mask"][:rows]
        device = padding.device
        start, end = start.expand(rows, 1, -1), end.expand(rows, 1, -1)
        positions = context["next_position"][:rows, None].expand(rows, length)
        mask = KeyPaddingGroups.from_padding(padding)
        token_index = torch.arange(rows * length, device=device).view(rows, length)
        block = NoisyBlock(
            cache=ReadOnlyContextCache.from_cache(context["cache"], rows),
            attention_mask=mask,
            routing=TokenRouting(token_index[:, [0, -1]].reshape(-1), token_index[:, 1:-1].reshape(-1)),
            position_embeddings=text_model.rotary_emb(start, positions),
            latent_block_mask=torch.ones(rows, length, dtype=torch.bool, device=device),
            start_embeds=start,
            end_embeds=end,
            position_embeds=position_embeds,
        )
        if device.type == "cuda":  # CUDA graphs keep these inputs in place instead of copying them at every replay
            for tensor in block.tensors():
                torch._dynamo.mark_static_address(tensor, guard=False)
        return block

    def denoising_step(
        self,
        block: "NoisyBlock",
        latents: torch.Tensor,
        time_embed: torch.Tensor,
        sigma: torch.Tensor,
        sigma_next: torch.Tensor,
        guidance: CfgGuidance,
    ) -> torch.Tensor:
        """One step of the sampler: the velocity of the noisy `latents` `[batch, h·w, 64]` (float32) in the rows of
        `block` (the full context, then the text- and image-guidance contexts that this step evaluates), their
        guidance combination and the Euler step from `sigma` to `sigma_next` (0-dim float32); `time_embed` `[hidden]`
        is the step's timestep embedding. Shapes are fixed by the request, and there is no data-dependent control flow
        and no host synchronisation: it compiles as one graph (`torch.compile(fullgraph=True)`)."""
        batch = latents.shape[0]
        velocity = self._noisy_block_velocity(block, latents, time_embed).split(batch)
        guided = combine_cfg_velocity(
            velocity[0],
            velocity[1] if len(velocity) > 1 else None,
            velocity[2] if len(velocity) > 2 else None,
            guidance.text_scale,
            guidance.image_scale,
            guidance.renorm_type,
            guidance.renorm_min,
        )
        return euler_step(latents, guided, sigma, sigma_next)

    def _noisy_block_velocity(self, block: "NoisyBlock", latents: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        """Velocity `[rows, h·w, 64]`, in the model's dtype, of `latents` `[batch, h·w, 64]` repeated over the rows of
        `block`."""
        rows = block.start_embeds.shape[0]
        model = self.model
        latent_embeds = model.noised_latent_embeddings(
            latents.repeat(rows // latents.shape[0], 1, 1), time_embed, block.position_embeds
        )
        embeds = torch.cat([block.start_embeds, latent_embeds.to(block.start_embeds.dtype), block.end_embeds], dim=1)
        hidden_states = model.language_model(
            inputs_embeds=embeds,
            attention_mask=block.attention_mask,
            cache=block.cache,
            latent_block_mask=block.latent_block_mask,
            routing=block.routing,
            position_embeddings=block.position_embeddings,
        ).last_hidden_state
        return self.llm2vae(cast_to_compute_dtype(hidden_states[:, 1:-1], self.llm2vae))

    def _compiled_denoising_step(self, compile_config: CompileConfig) -> Callable:
        """`torch.compile(self.denoising_step, **compile_config.to_dict())`, kept while the configuration is the same."""
        if getattr(self, "_denoising_step_compile_config", None) != compile_config:
            self._denoising_step_compile_config = compile_config
            self._compiled_denoising_step_call = torch.compile(self.denoising_step, **compile_config.to_dict())
        return self._compiled_denoising_step_call

    def decode_latents(self, latents: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """Latent tokens `[batch, h*w, 64]` → images `[batch, 3, 16h, 16w]` in [-1, 1], in the VAE's dtype.

        As the original, the latents are cast to the VAE's dtype before they are un-scaled (`z / scale + shift`), and
        the 8-bit conversion of the result (`postprocess_images`) runs in that dtype too.
        """
        vae = self.model.vae
        latent = unpatchify_latents(latents, grid_h, grid_w, self.config.latent_patch_size).to(vae.device, vae.dtype)
        latent = latent / vae.config.scaling_factor + vae.config.shift_factor
        with vae_precision(vae):
            return vae.decode(latent).sample

    def decode_image_tokens(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Any-to-any pipeline hook: latent tokens `[batch, h*w, 64]` of a `height × width` image → pixels in [-1, 1]."""
        downsample = self.config.latent_downsample
        return self.decode_latents(latents, height // downsample, width // downsample)


def _gather_left_padded(input_ids, embeds, keep):
    """Keeps the `keep` tokens of every row, left-padded: ids `[b, n]`, embeds `[b, n, d]`, padding mask `[b, n]`."""
    counts = keep.sum(dim=1)
    length = int(counts.max())
    ids = input_ids.new_zeros(input_ids.shape[0], length)
    emb = embeds.new_zeros(embeds.shape[0], length, embeds.shape[-1])
    mask = torch.zeros_like(ids)
    for row in range(input_ids.shape[0]):
        n = int(counts[row])
        if n:
            ids[row, length - n :] = input_ids[row][keep[row]]
            emb[row, length - n :] = embeds[row][keep[row]]
            mask[row, length - n :] = 1
    return ids, emb, mask


def _block_starts(input_ids: torch.Tensor, placeholder_id: int, config: UniMedVLConfig) -> torch.Tensor:
    """`[batch, seq]` marks of the `<|vision_start|>` tokens that open a block of `placeholder_id` tokens."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, :-1] = (input_ids[:, :-1] == config.vision_start_token_id) & (input_ids[:, 1:] == placeholder_id)
    return starts


def _blocks_per_row(input_ids: torch.Tensor, placeholder_id: int, config: UniMedVLConfig) -> list[int]:
    """How many image blocks of `placeholder_id` tokens (ViT or VAE) each row holds; images are numbered row by row."""
    return _block_starts(input_ids, placeholder_id, config).sum(dim=1).tolist()


def _first_block_per_row(input_ids: torch.Tensor, placeholder_id: int, config: UniMedVLConfig) -> list[int | None]:
    """The index (numbered over the batch) of each row's first image block of `placeholder_id` tokens, or None."""
    counts = _blocks_per_row(input_ids, placeholder_id, config)
    offsets = [sum(counts[:row]) for row in range(len(counts))]
    return [offset if count else None for offset, count in zip(offsets, counts)]


def _images_of_rows(counts: list[int], rows: list[int]) -> list[int]:
    """The image indices (numbered over the batch, row by row) that belong to `rows`, given each row's image count."""
    offsets = [sum(counts[:row]) for row in range(len(counts))]
    return [offsets[row] + index for row in rows for index in range(counts[row])]


def _append_to_full_context(segments: list[list[int]], input_ids, attention_mask, text_keep, image_keep, pad_id: int):
    """Appends each row's token `segments` after its tokens (padding in between is dropped when the contexts are
    gathered) as part of the full context only: the guidance keep masks do not select them."""
    batch, length = input_ids.shape[0], max(len(segment) for segment in segments)
    extra_ids = input_ids.new_full((batch, length), pad_id)
    extra_mask = attention_mask.new_zeros(batch, length)
    for row, segment in enumerate(segments):
        extra_ids[row, : len(segment)] = torch.tensor(segment, dtype=input_ids.dtype)
        extra_mask[row, : len(segment)] = 1
    unselected = torch.zeros_like(extra_mask, dtype=torch.bool)
    return (
        torch.cat([input_ids, extra_ids], dim=1),
        torch.cat([attention_mask, extra_mask], dim=1),
        torch.cat([text_keep, unselected], dim=1),
        torch.cat([image_keep, unselected], dim=1),
    )


def original_generation_config(config: UniMedVLConfig) -> GenerationConfig:
    """The text-decoding defaults written next to a converted checkpoint (`generation_config.json`).

    Greedy decoding of up to 512 new tokens that stops at `<|im_end|>`: the default of the original's `Bagel.chat`
    and `interleave_inference` (the original VQA script samples at temperature 1.0 instead: pass `do_sample=True`).
    Sampling draws from the full softmax at `temperature`, as the original: no top-p, and no top-k, which
    [`UniMedVLForConditionalGeneration.generate`] enforces (a file cannot hold `top_k=0` beside greedy decoding).
    """
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=512,
    )


__all__ = [
    "CheckpointError",
    "UniMedVLPreTrainedModel",
    "UniMedVLVisionModel",
    "UniMedVLTextModel",
    "UniMedVLModel",
    "UniMedVLForConditionalGeneration",
    "UniMedVLCausalLMOutputWithPast",
    "UniMedVLImageGenerationOutput",
    "combine_cfg_velocity",
    "cfg_context_masks",
    "original_generation_config",
    "patchify_latents",
    "unpatchify_latents",
    "sequence_structure",
    "build_attention_mask",
    "noise_latents",
]
