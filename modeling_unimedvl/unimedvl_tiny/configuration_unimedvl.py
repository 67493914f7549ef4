"""Configuration of UniMedVL, a Mixture-of-Transformers medical vision-language model (BAGEL architecture)."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig, SiglipVisionConfig
from transformers.configuration_utils import SubConfigSpec


FLUX_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
    "mid_block_add_attention": True,
}
"""diffusers `AutoencoderKL` arguments of the FLUX.1 autoencoder that the original release hard-codes."""


@strict
class UniMedVLConfig(PreTrainedConfig):
    r"""
    Configuration of [`UniMedVLForConditionalGeneration`].

    Args:
        text_config (`dict` or `Qwen2Config`):
            The language model. Every decoder layer holds two experts of this geometry: the understanding expert and
            the generation expert (`*_moe_gen`). Query/key RMS norms are always used (the release forces them).
        vision_config (`dict` or `SiglipVisionConfig`):
            The SigLIP NaViT encoder, with the number of layers actually instantiated (the release's
            `vit_config.json` says one more).
        vae_config (`dict`):
            Arguments of the diffusers `AutoencoderKL` (FLUX geometry by default), including `scaling_factor` and
            `shift_factor`.
        latent_patch_size (`int`): side of the square latent patch that becomes one generation token (2).
        max_latent_size (`int`): latent patches per side of the latent position table (64 → 1024 px images).
        vit_max_num_patch_per_side (`int`): ViT patches per side of the ViT position tables (70 → 980 px).
        connector_act (`str`): activation of the ViT→LLM MLP connector.
        bos_token_id, eos_token_id: `<|im_start|>` / `<|im_end|>`, the start and end of every text segment.
        vision_start_token_id, vision_end_token_id: `<|vision_start|>` / `<|vision_end|>` around every image block.
        image_token_id: placeholder of one ViT patch token in `input_ids`.
        latent_token_id: placeholder of one VAE latent token in `input_ids`.
    """

    model_type = "unimedvl"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "vision_config": SiglipVisionConfig,
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    vae_config: dict | None = None
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    bos_token_id: int = 151644
    eos_token_id: int = 151645
    pad_token_id: int | None = 151643
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    image_token_id: int = 151655
    latent_token_id: int = 151656
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.vae_config is None:
            self.vae_config = dict(FLUX_VAE_CONFIG)
        super().__post_init__(**kwargs)
        self.text_config.tie_word_embeddings = False

    @property
    def latent_channels(self) -> int:
        return self.vae_config["latent_channels"]

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side: the VAE's ×8 times the latent patch size."""
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1) * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        """Channels of one generation token: `latent_patch_size² × latent_channels` (64)."""
        return self.latent_patch_size**2 * self.latent_channels


__all__ = ["UniMedVLConfig", "FLUX_VAE_CONFIG"]
