"""Rectified-flow training objective of UniMedVL (BAGEL): logit-normal timesteps with shift, noising, velocity MSE."""

import torch


def sample_timesteps(num_images: int, shift: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """`[num_images]` timesteps `t = sigmoid(N(0, 1))` shifted to `t' = s·t / (1 + (s − 1)·t)`, in (0, 1).

    Drawn on the CPU (reproducible across devices); the smallest value is clamped to 1e-6 so that a target is always
    a noise block (t = 0 means a clean condition).
    """
    t = torch.sigmoid(torch.randn(num_images, generator=generator))
    t = shift * t / (1 + (shift - 1) * t)
    return t.clamp(min=1e-6)


def noise_latents(
    clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """`x_t = (1 − t)·x_0 + t·ε` for packed latent tokens `[num_tokens, 64]` of images with `lengths` tokens each and
    per-image `timesteps` `[num_images]` (t = 0 leaves clean conditioning images unchanged)."""
    t = timesteps.to(clean.device, clean.dtype).repeat_interleave(lengths.to(clean.device))[:, None]
    return (1 - t) * clean + t * noise


def flow_matching_mse(velocity: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the `token_mask` tokens of the per-token mean over channels of `(velocity − target)²`.

    `velocity`, `target` `[num_tokens, channels]` (target = ε − x_0); `token_mask` `[num_tokens]` marks noised tokens.
    Returns a zero that keeps the graph when no token is noised.
    """
    per_token = (velocity.float() - target.float()).pow(2).mean(dim=-1)
    if not token_mask.any():
        return per_token.sum() * 0.0
    return per_token[token_mask].mean()


__all__ = ["flow_matching_mse", "noise_latents", "sample_timesteps"]
