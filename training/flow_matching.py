"""Rectified-flow training objective of UniMedVL (BAGEL): logit-normal timesteps with shift, velocity MSE.

The noising `x_t = (1 − t)·x_0 + t·ε` is `modeling_unimedvl.modeling_unimedvl.noise_latents` (re-exported here), which
the model applies inside its forward.
"""

import torch
from modeling_unimedvl.modeling_unimedvl import noise_latents  # the model noises its latents in its forward


def sample_timesteps(num_images: int, shift: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """`[num_images]` timesteps `t = sigmoid(N(0, 1))` shifted to `t' = s·t / (1 + (s − 1)·t)`, in (0, 1).

    Drawn on the CPU (reproducible across devices); the smallest value is clamped to 1e-6 so that a target is always
    a noise block (t = 0 means a clean condition).
    """
    t = torch.sigmoid(torch.randn(num_images, generator=generator))
    t = shift * t / (1 + (shift - 1) * t)
    return t.clamp(min=1e-6)


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
