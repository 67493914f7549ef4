"""UniMedVL: SigLIP NaViT + Qwen2 Mixture-of-Transformers (understanding and generation experts) + FLUX VAE.

One packed sequence holds text tokens, ViT patch tokens and VAE latent tokens. Every token is routed by type to the
understanding expert (text and ViT tokens) or the generation expert (latent tokens); both experts' queries, keys and
values meet in one joint attention. Text is causal; an image block (`<|vision_start|>` … `<|vision_end|>`) is
bidirectional inside and shares one RoPE position; a noised image block is invisible to later tokens.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen2Config, SiglipVisionConfig
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
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
from transformers.utils import ModelOutput

from .configuration_unimedvl import UniMedVLConfig


CFG_RENORM_TYPES = ("global", "channel", "text_channel")
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
"""Name of the KV cache in transformers' model outputs and in what `generate()` passes to `forward`: `cache` from
transformers 5.24 on, `past_key_values` before. The forwards accept both names."""


# ----------------------------------------------------------------------------------------------------------------------
# Token routing and sequence structure
# ----------------------------------------------------------------------------------------------------------------------


class TokenRouting:
    """Flat indices of the understanding and generation tokens of a `[batch, seq]` block of hidden states."""

    def __init__(self, gen_token_mask: torch.Tensor | None):
        flat = gen_token_mask.reshape(-1) if gen_token_mask is not None else None
        self.gen_index = flat.nonzero().squeeze(-1) if flat is not None else None
        if self.gen_index is not None and self.gen_index.numel() == 0:
            self.gen_index = None
        self.und_index = (~flat).nonzero().squeeze(-1) if self.gen_index is not None else None

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
    to the generation expert; `next_position`: `[batch]` RoPE position that the next token would get.
    """

    position_ids: torch.Tensor
    block_ids: torch.Tensor
    noise_mask: torch.Tensor
    gen_token_mask: torch.Tensor
    next_position: torch.Tensor


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

    noise_mask = torch.zeros_like(inside)
    if latent_noise_mask is not None and latent_noise_mask.any():
        num_blocks = int(opened.max()) + 1
        noisy_block = torch.zeros(input_ids.shape[0], num_blocks, dtype=torch.long, device=input_ids.device)
        noisy_block.scatter_reduce_(1, block_ids.clamp(min=0), latent_noise_mask.long(), reduce="amax")
        noise_mask = inside & noisy_block.gather(1, block_ids.clamp(min=0)).bool()

    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(inside)
    advances = real & (~inside | (is_end & ~noise_mask))
    cumulative = advances.long().cumsum(-1)
    position_ids = (cumulative - advances.long()).masked_fill(~real, 0)
    return SequenceStructure(position_ids, block_ids, noise_mask, gen_token_mask, cumulative[:, -1])


def build_attention_mask(
    block_ids: torch.Tensor,
    noise_mask: torch.Tensor,
    padding_mask: torch.Tensor | None,
    past_length: int,
    kv_length: int,
    dtype: torch.dtype,
    sample_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive attention mask `[batch, 1, q, kv_length]` of a chunk of `q` new tokens appended to `past_length` cached ones.

    Cached tokens are visible to every new token (bottom-right causal alignment); among the new tokens, text is
    causal, an image block sees itself entirely, and a noise block is invisible outside itself. `padding_mask`
    `[batch, past_length + q]` (1 = real token) hides padding; keys beyond `past_length + q` (an unused static cache
    tail) are hidden. `sample_ids` `[batch, q]` (packed training rows) confines attention to tokens of one sample.
    """
    batch, q_len = block_ids.shape
    device = block_ids.device
    index = torch.arange(q_len, device=device)
    same_block = (block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] >= 0)
    allowed = (index[:, None] >= index[None, :]) | same_block
    allowed &= ~(noise_mask[:, None, :] & ~same_block)
    if sample_ids is not None:
        allowed &= sample_ids[:, :, None] == sample_ids[:, None, :]
    allowed = torch.cat(
        [
            torch.ones(batch, q_len, past_length, dtype=torch.bool, device=device),
            allowed,
            torch.zeros(batch, q_len, kv_length - past_length - q_len, dtype=torch.bool, device=device),
        ],
        dim=-1,
    )
    if padding_mask is not None:
        keys = padding_mask.bool()
        keys = torch.nn.functional.pad(keys, (0, kv_length - keys.shape[-1]), value=False)
        allowed &= keys[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


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
        embeddings = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        return embeddings + self.position_embedding(position_ids)


class UniMedVLConnector(nn.Module):
    """Two-layer MLP from ViT features to the language model's hidden size."""

    def __init__(self, config: UniMedVLConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.act = ACT2FN[config.connector_act]
        self.fc2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(features)))


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
        """Per-expert projection then per-head RMS norm: `[batch, seq, hidden]` → `[batch, heads, seq, head_dim]`."""
        proj, proj_gen = getattr(self, f"{name}_proj"), getattr(self, f"{name}_proj_moe_gen")
        states = routing(hidden_states, proj, proj_gen)
        states = states.view(*hidden_states.shape[:2], -1, self.head_dim)
        if name != "v":
            states = routing(states, getattr(self, f"{name}_norm"), getattr(self, f"{name}_norm_moe_gen"))
        return states.transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        routing: TokenRouting,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
        cache: Cache | None = None,
        update_cache: bool = True,
        **kwargs,
    ) -> torch.Tensor:
        query, key, value = (self._project(hidden_states, routing, name) for name in ("q", "k", "v"))
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            if update_cache:
                key, value = cache.update(key, value, self.layer_idx)
            elif cache.get_seq_length(self.layer_idx) > 0:
                layer = cache.layers[self.layer_idx]
                key = torch.cat([layer.keys, key], dim=2)
                value = torch.cat([layer.values, value], dim=2)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
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
        attention_mask: torch.Tensor,
        cache: Cache | None = None,
        update_cache: bool = True,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = routing(hidden_states, self.input_layernorm, self.input_layernorm_moe_gen)
        hidden_states = self.self_attn(
            hidden_states, routing, position_embeddings, attention_mask, cache, update_cache, **kwargs
        )
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
    _can_compile_fullgraph = False

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
        lengths = (image_grid_hw[:, 0] * image_grid_hw[:, 1]).tolist()
        sequences = list(embeddings.split(lengths))
        padded = nn.utils.rnn.pad_sequence(sequences, batch_first=True)
        valid = nn.utils.rnn.pad_sequence([torch.ones(n, dtype=torch.bool) for n in lengths], batch_first=True)
        valid = valid.to(padded.device)
        mask = torch.zeros(valid.shape, dtype=padded.dtype, device=padded.device)
        mask = mask.masked_fill_(~valid, torch.finfo(padded.dtype).min)[:, None, None, :]
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
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        gen_token_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        update_cache: bool = True,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`inputs_embeds` `[batch, seq, hidden]`, 4-D additive `attention_mask`, `position_ids` `[batch, seq]`."""
        routing = TokenRouting(gen_token_mask)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                routing,
                position_embeddings,
                attention_mask,
                cache=cache,
                update_cache=update_cache,
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
        time_embeds = self.time_embedder(self.time_proj(timesteps).to(self.vae2llm.weight.dtype))
        positions = grid_position_ids(latent_grid_hw, self.config.max_latent_size)
        return self.vae2llm(latents.to(self.vae2llm.weight.dtype)) + time_embeds + self.latent_pos_embed(positions)

    def encode_images(
        self, vae_pixel_values: list[torch.Tensor], sample: bool = False, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE-encodes images `[3, H, W]` in [-1, 1] → packed latent tokens `[num_tokens, 64]` and their grids `[n, 2]`.

        `sample=True` draws from the posterior (the original behaviour) with `generator`; otherwise its mean is used.
        """
        tokens, grids = [], []
        scale, shift = self.vae.config.scaling_factor, self.vae.config.shift_factor
        for image in vae_pixel_values:
            downsample = self.config.latent_downsample
            if image.shape[-2] % downsample or image.shape[-1] % downsample:
                raise ValueError(
                    f"VAE images need sides that are multiples of {downsample} pixels, got {tuple(image.shape[-2:])}; "
                    "resize them with the processor."
                )
            pixels = image[None].to(self.vae.device, self.vae.dtype)
            posterior = self.vae.encode(pixels).latent_dist
            latent = posterior.sample(generator) if sample else posterior.mean
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
        `attention_mask` `[batch, past + seq]` marks real tokens. `update_cache=False` attends to the cache without
        writing the chunk into it (denoising steps). `position_ids` are required after a non-empty cache.
        `sample_ids` `[batch, seq]` mark the samples packed into one row (training without a cache): attention stays
        inside a sample; pass each sample's own `position_ids`.

        Training passes `vae_pixel_values` with `latent_timesteps` `[num_images]` and `latent_noise` `[num_tokens, 64]`:
        the images are encoded here (posterior sample with `vae_sample=True`, else its mean) and noised to
        `(1 − t)·x_0 + t·ε`, so that sharded VAE weights (FSDP, ZeRO-3) are only used inside the forward; the clean
        latents come back as `clean_latents` for the flow-matching target `ε − x_0`.
        """
        cache = _cache_argument(cache, kwargs)
        if sample_ids is not None and cache is not None and cache.get_seq_length() > 0:
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
        past_length = cache.get_seq_length() if cache is not None else 0
        noise = None
        if latent_timesteps is not None and (latent_timesteps > 0).any():
            noise = torch.zeros_like(input_ids, dtype=torch.bool)
            lengths = latent_grid_hw[:, 0] * latent_grid_hw[:, 1]
            per_token = (latent_timesteps > 0).to(input_ids.device).repeat_interleave(lengths.to(input_ids.device))
            noise[input_ids == self.config.latent_token_id] = per_token
        # A text decoding step (one new token after a cache, no image inputs) routes to the understanding expert and
        # embeds without looking for placeholders: no device-to-host synchronisation in the decoding loop.
        text_step = past_length > 0 and input_ids.shape[1] == 1 and pixel_values is None and latents is None
        chunk_mask = attention_mask[:, past_length:] if attention_mask is not None else None
        structure = sequence_structure(input_ids, self.config, chunk_mask, noise)
        gen_token_mask = None if text_step else structure.gen_token_mask
        if position_ids is None:
            if past_length > 0:
                raise ValueError("`position_ids` are required when appending to a non-empty cache.")
            position_ids = structure.position_ids
        if inputs_embeds is None and text_step:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        elif inputs_embeds is None:
            inputs_embeds = self.embed_inputs(
                input_ids, pixel_values, image_grid_hw, latents, latent_grid_hw, latent_timesteps
            )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.text_config)
        kv_length = cache.get_mask_sizes(input_ids.shape[1], 0)[0] if cache is not None else input_ids.shape[1]
        if not update_cache:
            kv_length = past_length + input_ids.shape[1]
        mask = build_attention_mask(
            structure.block_ids, structure.noise_mask, attention_mask, past_length, kv_length, inputs_embeds.dtype, sample_ids
        )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            gen_token_mask=gen_token_mask,
            cache=cache,
            update_cache=update_cache,
            **kwargs,
        )
        return UniMedVLModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            gen_token_mask=gen_token_mask,
            clean_latents=clean_latents,
            **{CACHE_FIELD: cache if use_cache or not update_cache else None},
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


def combine_cfg_velocity(
    v_cond: torch.Tensor,
    v_text: torch.Tensor | None,
    v_image: torch.Tensor | None,
    text_scale: float,
    image_scale: float,
    renorm_type: str,
    renorm_min: float,
) -> torch.Tensor:
    """Classifier-free guidance of BAGEL/UniMedVL over velocities `[batch, tokens, channels]`.

    `v_text` comes from the context without the last text segment, `v_image` from the context without images; a
    branch is `None` where its scale is inactive (≤ 1). Renorm rescales the guided velocity to at most the norm of
    `v_cond`: over each whole image (`global`), per token (`channel`), or per token of the text-guided part only
    before image guidance (`text_channel`).
    """
    if v_text is None:
        return v_cond
    guided = v_text + text_scale * (v_cond - v_text)
    if renorm_type == "text_channel":
        guided = guided * _renorm_factor(v_cond, guided, (-1,), renorm_min)
        return v_image + image_scale * (guided - v_image) if v_image is not None else guided
    if v_image is not None:
        guided = v_image + image_scale * (guided - v_image)
    dims = (-1,) if renorm_type == "channel" else (-2, -1)
    return guided * _renorm_factor(v_cond, guided, dims, renorm_min)


def _renorm_factor(reference: torch.Tensor, guided: torch.Tensor, dims: tuple[int, ...], minimum: float) -> torch.Tensor:
    norm_ref = torch.linalg.vector_norm(reference, dim=dims, keepdim=True)
    norm_guided = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
    return (norm_ref / (norm_guided + 1e-8)).clamp(min=minimum, max=1.0)


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
    """`images`: `[batch, 3, H, W]` in [-1, 1] (or `None` for latents only); `latents`: final tokens `[batch, h*w, 64]`."""

    images: torch.Tensor | None = None
    latents: torch.Tensor | None = None


class UniMedVLForConditionalGeneration(UniMedVLPreTrainedModel, GenerationMixin):
    """UniMedVL with the language-model head (understanding) and the flow head `llm2vae` (image generation)."""

    output_modalities = ("image", "text")
    _tied_weights_keys = {}
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
            velocity = self.llm2vae(hidden_states[outputs.gen_token_mask])
        kept = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        logits = self.lm_head(kept)
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

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """The model builds its block masks itself from the 2-D padding mask."""
        return attention_mask

    def prepare_inputs_for_generation(self, input_ids, is_first_iteration=False, **kwargs):
        """The library's preparation (it receives the cache under the name of the installed transformers); image
        inputs are dropped after the prefill."""
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("vae_pixel_values", "latents", "latent_grid_hw", "latent_timesteps", "image_grid_hw"):
                kwargs.pop(key, None)
        return super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)

    @torch.no_grad()
    def generate(self, inputs=None, generation_mode: str = "text", **kwargs):
        """`generation_mode="text"`: [`GenerationMixin.generate`] (greedy, sampling, …; stops at `<|im_end|>`).
        `generation_mode="image"`: [`generate_image`]."""
        if generation_mode == "text":
            return super().generate(inputs, **kwargs)
        if generation_mode == "image":
            if inputs is not None:
                kwargs["input_ids"] = inputs
            return self.generate_image(**kwargs)
        raise ValueError(f"Unsupported generation_mode {generation_mode!r}: UniMedVL generates 'text' or 'image'.")

    # ------------------------------------------------------------------ image generation (rectified flow)

    @torch.no_grad()
    def generate_image(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        vae_pixel_values: list[torch.Tensor] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timestep_shift: float | None = None,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 1.5,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_type: str = "global",
        cfg_renorm_min: float = 0.0,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        vae_encode: str = "sample",
        decode: bool = True,
        callback_on_step_end: Callable | None = None,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        **kwargs,
    ) -> UniMedVLImageGenerationOutput:
        """Generates one image per row of `input_ids` `[batch, seq]` by rectified flow with classifier-free guidance.

        The context (prompt, and for image-conditioned generation the input image as a clean VAE block plus a ViT
        block) is prefilled once for three branches: the full context, the context without its last text segment
        (text guidance) and the context without images (image guidance). Each of the `num_inference_steps - 1` Euler
        steps runs the noisy `[<|vision_start|>, h*w latents, <|vision_end|>]` block against those caches without
        writing it. `latents` `[batch, h*w, 64]` replace the initial noise (drawn on the CPU from `generator`
        otherwise); the flow state stays float32. `vae_encode` ("sample" as the original, or "mean") chooses how input
        images are encoded. The schedule is BAGEL's: `linspace(1, 0, num_inference_steps)` shifted by `timestep_shift`
        (default 3.0), run by `scheduler` (a `FlowMatchEulerDiscreteScheduler`, created if not given; a given
        `timestep_shift` is set on it). `callback_on_step_end(step, timestep, latents)` may return new latents.
        Returns images in [-1, 1] `[batch, 3, height, width]` (`decode=False`: `None`) and the final latent tokens.
        """
        if kwargs:
            raise TypeError(f"generate_image() got unexpected arguments: {sorted(kwargs)}")
        if cfg_renorm_type not in CFG_RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {CFG_RENORM_TYPES}, got {cfg_renorm_type!r}.")
        if vae_encode not in ("sample", "mean"):
            raise ValueError(f"vae_encode must be 'sample' or 'mean', got {vae_encode!r}.")
        if num_inference_steps < 2:
            raise ValueError(f"num_inference_steps must be at least 2 (one Euler step), got {num_inference_steps}.")
        config, device = self.config, self.device
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cond_latents = cond_grid = None
        if vae_pixel_values is not None and len(vae_pixel_values) > 0:
            cond_latents, cond_grid = self.model.encode_images(
                vae_pixel_values, sample=vae_encode == "sample", generator=generator
            )
        height, width = self.output_size(height, width, vae_pixel_values)
        grid_h, grid_w = height // config.latent_downsample, width // config.latent_downsample
        num_tokens = grid_h * grid_w
        if latents is None:
            latents = randn_tensor((batch, num_tokens, config.patch_latent_dim), generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        latents = latents.reshape(batch, num_tokens, config.patch_latent_dim).to(device, torch.float32)

        context = self._prefill_cfg_contexts(
            input_ids, attention_mask, pixel_values, image_grid_hw, cond_latents, cond_grid
        )
        if scheduler is None:
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0 if timestep_shift is None else timestep_shift)
        elif timestep_shift is not None:
            scheduler.set_shift(timestep_shift)
        sigmas = torch.linspace(1, 0, num_inference_steps)[:-1].tolist()
        scheduler.set_timesteps(sigmas=sigmas, device=device)
        use_text = cfg_text_scale > 1.0
        use_image = use_text and cfg_img_scale > 1.0
        for step, timestep in enumerate(scheduler.timesteps):
            sigma = float(scheduler.sigmas[step])
            in_interval = cfg_interval[0] < sigma <= cfg_interval[1]
            branches = 1 + (use_text and in_interval) + (use_image and in_interval)
            velocity = self._flow_velocity(context, latents, sigma, branches, grid_h, grid_w)
            v_cond, v_rest = velocity[:batch], velocity[batch:].split(batch)
            v_text = v_rest[0] if branches > 1 else None
            v_image = v_rest[1] if branches > 2 else None
            guided = combine_cfg_velocity(
                v_cond, v_text, v_image, cfg_text_scale, cfg_img_scale, cfg_renorm_type, cfg_renorm_min
            )
            latents = scheduler.step(guided.float(), timestep, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                latents = callback_on_step_end(step, timestep, latents)
        images = self.decode_latents(latents, grid_h, grid_w) if decode else None
        return UniMedVLImageGenerationOutput(images=images, latents=latents)

    def output_size(self, height: int | None, width: int | None, vae_pixel_values=None) -> tuple[int, int]:
        """The generated image's `(height, width)`: as given, else the first input image's, else the largest size;
        checked against the latent grid (multiples of `latent_downsample` up to `max_latent_size` latents)."""
        downsample = self.config.latent_downsample
        if height is None or width is None:
            if vae_pixel_values:
                height, width = vae_pixel_values[0].shape[-2:]
            else:
                height = width = self.config.max_latent_size * downsample
        limit = self.config.max_latent_size * downsample
        if height % downsample or width % downsample or not (0 < height <= limit and 0 < width <= limit):
            raise ValueError(
                f"height and width must be positive multiples of {downsample} up to {limit} pixels, got {height}x{width}."
            )
        return int(height), int(width)

    def _prefill_cfg_contexts(self, input_ids, attention_mask, pixel_values, image_grid_hw, cond_latents, cond_grid):
        """Prefills [full, without last text, without images] contexts as one left-padded batch of `3 * batch` rows."""
        config = self.config
        embeds = self.model.embed_inputs(input_ids, pixel_values, image_grid_hw, cond_latents, cond_grid)
        real = attention_mask.bool()
        structure = sequence_structure(input_ids, config, attention_mask)
        in_image = structure.block_ids >= 0
        is_bos = (input_ids == config.bos_token_id) & real & ~in_image
        if not is_bos.any(dim=1).all():
            raise ValueError("Every prompt needs a text segment (<|im_start|> … <|im_end|>); got an empty prompt.")
        index = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_text_start = torch.where(is_bos, index, -1).amax(dim=1, keepdim=True)
        selections = [real, real & (index < last_text_start), real & ~in_image]
        rows = [_gather_left_padded(input_ids, embeds, keep) for keep in selections]
        length = max(ids.shape[1] for ids, _, _ in rows)
        ids = torch.cat([nn.functional.pad(r[0], (length - r[0].shape[1], 0), value=config.pad_token_id or 0) for r in rows])
        emb = torch.cat([nn.functional.pad(r[1], (0, 0, length - r[1].shape[1], 0)) for r in rows])
        mask = torch.cat([nn.functional.pad(r[2], (length - r[2].shape[1], 0)) for r in rows])
        cache = DynamicCache(config=config.text_config)
        if length > 0:
            self.model(input_ids=ids, attention_mask=mask, inputs_embeds=emb, cache=cache, use_cache=True)
        next_position = sequence_structure(ids, config, mask).next_position
        batch = input_ids.shape[0]
        return {"caches": {3 * batch: cache}, "attention_mask": mask, "next_position": next_position, "batch": batch}

    def _flow_velocity(self, context, latents, sigma, branches, grid_h, grid_w) -> torch.Tensor:
        """Velocity `[branches * batch, h*w, 64]` of the noisy latents `[batch, h*w, 64]` at time `sigma` for the first `branches` contexts."""
        config, batch = self.config, context["batch"]
        rows = branches * batch
        num_tokens = grid_h * grid_w
        block = [config.vision_start_token_id] + [config.latent_token_id] * num_tokens + [config.vision_end_token_id]
        block_ids = torch.tensor(block, device=latents.device).expand(rows, -1)
        caches = context["caches"]
        if rows not in caches:
            caches[rows] = _select_cache_rows(caches[3 * batch], rows)
        cache = caches[rows]
        mask = torch.cat([context["attention_mask"][:rows], torch.ones_like(block_ids)], dim=1)
        positions = context["next_position"][:rows, None].expand(rows, block_ids.shape[1])
        grid = torch.tensor([[grid_h, grid_w]], device=latents.device).expand(rows, 2)
        outputs = self.model(
            input_ids=block_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            latents=latents.repeat(branches, 1, 1).reshape(rows * num_tokens, -1),
            latent_grid_hw=grid,
            latent_timesteps=torch.full((rows,), sigma, device=latents.device),
            update_cache=False,
        )
        velocity = self.llm2vae(outputs.last_hidden_state[:, 1:-1])
        return velocity.float()

    def decode_latents(self, latents: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """Latent tokens `[batch, h*w, 64]` → images `[batch, 3, 16h, 16w]` in [-1, 1] through the VAE."""
        vae = self.model.vae
        latent = unpatchify_latents(latents, grid_h, grid_w, self.config.latent_patch_size)
        latent = latent / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(latent.to(vae.device, vae.dtype)).sample.float()

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


def _select_cache_rows(cache: DynamicCache, rows: int) -> DynamicCache:
    """A cache view holding the first `rows` batch rows of `cache` (no copy)."""
    selected = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        if layer.is_initialized:
            selected.update(layer.keys[:rows], layer.values[:rows], layer_idx)
    return selected


__all__ = [
    "UniMedVLPreTrainedModel",
    "UniMedVLVisionModel",
    "UniMedVLTextModel",
    "UniMedVLModel",
    "UniMedVLForConditionalGeneration",
    "UniMedVLCausalLMOutputWithPast",
    "UniMedVLImageGenerationOutput",
    "combine_cfg_velocity",
    "patchify_latents",
    "unpatchify_latents",
    "sequence_structure",
    "build_attention_mask",
    "noise_latents",
]
