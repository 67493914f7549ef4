"""Model configurations the benchmarks build with random weights: the full-size release (Qwen2.5-7B MoT + SigLIP
so400m + FLUX VAE), a mid-size training configuration (Qwen2.5-1.5B MoT), and the tiny CPU configuration."""

from modeling_unimedvl import UniMedVLConfig
from modeling_unimedvl.configuration_unimedvl import FLUX_VAE_CONFIG


SIGLIP_SO400M = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16, patch_size=14, image_size=980
)
"""SigLIP so400m/14 NaViT as the release instantiates it (26 layers, 70×70 position table)."""

QWEN25_7B = dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)

QWEN25_15B = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)

TINY_TOKEN_IDS = dict(
    bos_token_id=600,
    eos_token_id=601,
    vision_start_token_id=602,
    vision_end_token_id=603,
    image_token_id=604,
    latent_token_id=605,
    pad_token_id=0,
)


def full_size_config() -> UniMedVLConfig:
    """The released 14.6 B-parameter geometry: Qwen2.5-7B MoT, SigLIP so400m (26 layers), FLUX VAE, 64×64 latents."""
    return UniMedVLConfig(
        text_config=dict(QWEN25_7B), vision_config=dict(SIGLIP_SO400M), vae_config=dict(FLUX_VAE_CONFIG), max_latent_size=64
    )


def training_config(vision_layers: int = 26) -> UniMedVLConfig:
    """Mid-size training geometry: Qwen2.5-1.5B MoT (with its generation expert), SigLIP so400m, FLUX VAE."""
    return UniMedVLConfig(
        text_config=dict(QWEN25_15B),
        vision_config=dict(SIGLIP_SO400M, num_hidden_layers=vision_layers),
        vae_config=dict(FLUX_VAE_CONFIG),
        max_latent_size=64,
    )


TINY_DEPTHS = {"tiny": (2, 2), "full": (QWEN25_7B["num_hidden_layers"], SIGLIP_SO400M["num_hidden_layers"])}
"""Decoder and ViT layers of the tiny-width model: `tiny` for smoke runs, `full` the release's depth (28 decoder, 26
ViT layers), the CPU proxy of the per-step overheads (kernel launches, host synchronisations) that decide GPU speed."""


def tiny_config(depth: str = "tiny") -> UniMedVLConfig:
    """A model of the same architecture at tiny width (hidden 64) for CPU runs, `depth` from `TINY_DEPTHS`."""
    if depth not in TINY_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(TINY_DEPTHS)}, got {depth!r}.")
    decoder_layers, vision_layers = TINY_DEPTHS[depth]
    return UniMedVLConfig(
        text_config=dict(
            model_type="qwen2",
            vocab_size=640,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=decoder_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2, image_size=980,
            patch_size=14,
        ),
        vae_config=dict(FLUX_VAE_CONFIG, block_out_channels=[32, 64, 128, 128], layers_per_block=1),
        **TINY_TOKEN_IDS,
    )


__all__ = ["QWEN25_15B", "QWEN25_7B", "SIGLIP_SO400M", "TINY_DEPTHS", "full_size_config", "tiny_config", "training_config"]
