"""Writes a synthetic original release folder with the 14B release's exact key names, shapes and dtypes.

The tensor data are sparse files (holes read as zeros and cost no disk). Key names and shapes follow the original
layout (reference-model.md §3.3 for `ema.safetensors`, the FLUX AutoEncoder for `ae.safetensors`), written here from
the architecture description rather than from this package's model, so that the converter is checked against an
independent statement of the release.
"""

import json
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers


RELEASE_LLM = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False, "sliding_window": 131072,
    "max_window_layers": 28, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
}
RELEASE_VIT = {
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 980, "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-06, "attention_dropout": 0.0,
}
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
QWEN_BASE_VOCAB = 151643


def ema_tensors(llm: dict, vit: dict, latent_grid: int = 64, latent_dim: int = 64) -> dict[str, tuple]:
    """`{key: shape}` of the original `ema.safetensors` (BAGEL names), with the ViT one layer short of its config."""
    hidden, inter, vocab = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    head_dim = hidden // llm["num_attention_heads"]
    kv = llm["num_key_value_heads"] * head_dim
    shapes = {"language_model.model.embed_tokens.weight": (vocab, hidden), "language_model.lm_head.weight": (vocab, hidden)}
    for i in range(llm["num_hidden_layers"]):
        prefix = f"language_model.model.layers.{i}."
        for suffix in ("", "_moe_gen"):
            for name, rows in (("q", hidden), ("k", kv), ("v", kv)):
                shapes[f"{prefix}self_attn.{name}_proj{suffix}.weight"] = (rows, hidden)
                shapes[f"{prefix}self_attn.{name}_proj{suffix}.bias"] = (rows,)
            shapes[f"{prefix}self_attn.o_proj{suffix}.weight"] = (hidden, hidden)
            shapes[f"{prefix}self_attn.q_norm{suffix}.weight"] = (head_dim,)
            shapes[f"{prefix}self_attn.k_norm{suffix}.weight"] = (head_dim,)
            mlp = "mlp" + suffix
            shapes[f"{prefix}{mlp}.gate_proj.weight"] = (inter, hidden)
            shapes[f"{prefix}{mlp}.up_proj.weight"] = (inter, hidden)
            shapes[f"{prefix}{mlp}.down_proj.weight"] = (hidden, inter)
            shapes[f"{prefix}input_layernorm{suffix}.weight"] = (hidden,)
            shapes[f"{prefix}post_attention_layernorm{suffix}.weight"] = (hidden,)
    shapes["language_model.model.norm.weight"] = (hidden,)
    shapes["language_model.model.norm_moe_gen.weight"] = (hidden,)
    shapes.update({
        "time_embedder.mlp.0.weight": (hidden, 256), "time_embedder.mlp.0.bias": (hidden,),
        "time_embedder.mlp.2.weight": (hidden, hidden), "time_embedder.mlp.2.bias": (hidden,),
        "vae2llm.weight": (hidden, latent_dim), "vae2llm.bias": (hidden,),
        "llm2vae.weight": (latent_dim, hidden), "llm2vae.bias": (latent_dim,),
        "latent_pos_embed.pos_embed": (latent_grid * latent_grid, hidden),
    })
    vh, vi, side = vit["hidden_size"], vit["intermediate_size"], vit["image_size"] // vit["patch_size"]
    v = "vit_model.vision_model."
    shapes[v + "embeddings.position_embedding.weight"] = (side * side, vh)
    shapes[v + "embeddings.patch_embedding.weight"] = (vh, 3 * vit["patch_size"] ** 2)
    shapes[v + "embeddings.patch_embedding.bias"] = (vh,)
    for i in range(vit["num_hidden_layers"] - 1):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q", "k", "v", "out"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (vh, vh)
            shapes[f"{p}self_attn.{proj}_proj.bias"] = (vh,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (vh,)
        shapes[f"{p}mlp.fc1.weight"], shapes[f"{p}mlp.fc1.bias"] = (vi, vh), (vi,)
        shapes[f"{p}mlp.fc2.weight"], shapes[f"{p}mlp.fc2.bias"] = (vh, vi), (vh,)
    shapes[v + "post_layernorm.weight"] = shapes[v + "post_layernorm.bias"] = (vh,)
    shapes.update({
        "connector.fc1.weight": (hidden, vh), "connector.fc1.bias": (hidden,),
        "connector.fc2.weight": (hidden, hidden), "connector.fc2.bias": (hidden,),
        "vit_pos_embed.pos_embed": (side * side, hidden),
    })
    return shapes


def flux_ae_tensors(ch: int = 128, ch_mult=(1, 2, 4, 4), num_res_blocks: int = 2, z_channels: int = 16) -> dict[str, tuple]:
    """`{key: shape}` of the FLUX AutoEncoder state dict (BFL names)."""
    shapes = {}

    def conv(name, out_ch, in_ch, k=3):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out_ch, in_ch, k, k), (out_ch,)

    def norm(name, channels):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (channels,)

    def resnet(name, in_ch, out_ch):
        norm(f"{name}.norm1", in_ch), conv(f"{name}.conv1", out_ch, in_ch)
        norm(f"{name}.norm2", out_ch), conv(f"{name}.conv2", out_ch, out_ch)
        if in_ch != out_ch:
            conv(f"{name}.nin_shortcut", out_ch, in_ch, 1)

    def mid(prefix, channels):
        resnet(f"{prefix}.mid.block_1", channels, channels)
        norm(f"{prefix}.mid.attn_1.norm", channels)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{proj}", channels, channels, 1)
        resnet(f"{prefix}.mid.block_2", channels, channels)

    conv("encoder.conv_in", ch, 3)
    in_ch = ch
    for level, mult in enumerate(ch_mult):
        for block in range(num_res_blocks):
            resnet(f"encoder.down.{level}.block.{block}", in_ch, ch * mult)
            in_ch = ch * mult
        if level != len(ch_mult) - 1:
            conv(f"encoder.down.{level}.downsample.conv", in_ch, in_ch)
    mid("encoder", in_ch)
    norm("encoder.norm_out", in_ch)
    conv("encoder.conv_out", 2 * z_channels, in_ch)

    top = ch * ch_mult[-1]
    conv("decoder.conv_in", top, z_channels)
    mid("decoder", top)
    in_ch = top
    for level in reversed(range(len(ch_mult))):
        for block in range(num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{block}", in_ch, ch * ch_mult[level])
            in_ch = ch * ch_mult[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", in_ch, in_ch)
    norm("decoder.norm_out", in_ch)
    conv("decoder.conv_out", 3, in_ch)
    return shapes


def sincos_table(grid: int, dim: int) -> torch.Tensor:
    """MAE 2-D sin-cos table `[grid², dim]`: row h*grid+w = [sin, cos](w·ω) ++ [sin, cos](h·ω), ω_k = 10000^(-k/(dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]
    one_d = torch.cat([coords.sin(), coords.cos()], dim=1)
    rows = one_d[:, None, :].expand(grid, grid, dim // 2)
    cols = one_d[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([cols, rows], dim=-1).reshape(grid * grid, dim)


def write_sparse_safetensors(path: str, shapes: dict[str, tuple], dtype: str, data: dict | None = None) -> int:
    """Writes a valid safetensors header for `shapes`, the tensors in `data` at their offsets, and extends the file
    sparsely (holes read as zeros); returns the number of elements."""
    itemsize = {"BF16": 2, "F32": 4}[dtype]
    header, offset, elements = {}, 0, 0
    for key, shape in shapes.items():
        count = 1
        for dim in shape:
            count *= dim
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + count * itemsize]}
        offset += count * itemsize
        elements += count
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    torch_dtype = {"BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        handle.truncate(8 + len(encoded) + offset)
        for key, tensor in (data or {}).items():
            handle.seek(8 + len(encoded) + header[key]["data_offsets"][0])
            handle.write(tensor.to(torch_dtype).contiguous().view(torch.uint8).numpy().tobytes())
    return elements


def write_qwen_like_tokenizer(folder: str) -> None:
    """A byte-level BPE tokenizer with Qwen2.5's size and special-token ids (151643 … 151664)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    for index in range(len(vocab), QWEN_BASE_VOCAB):
        vocab[f"tok{index}"] = index
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens(QWEN_SPECIAL_TOKENS)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as handle:
        json.dump({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "bos_token": None, "model_max_length": 32768}, handle)


def write_synthetic_release(folder: str) -> dict[str, int]:
    """Writes the release folder; returns tensor and element counts of `ema.safetensors` and `ae.safetensors`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "llm_config.json"), "w") as handle:
        json.dump(RELEASE_LLM, handle)
    with open(os.path.join(folder, "vit_config.json"), "w") as handle:
        json.dump(RELEASE_VIT, handle)
    ema = ema_tensors(RELEASE_LLM, RELEASE_VIT)
    ae = flux_ae_tensors()
    tables = {key: sincos_table(int(shape[0] ** 0.5), shape[1]) for key, shape in ema.items() if key.endswith("pos_embed")}
    ema_elements = write_sparse_safetensors(os.path.join(folder, "ema.safetensors"), ema, "BF16", tables)
    ae_elements = write_sparse_safetensors(os.path.join(folder, "ae.safetensors"), ae, "F32")
    write_qwen_like_tokenizer(folder)
    return {"ema_tensors": len(ema), "ema_elements": ema_elements, "ae_tensors": len(ae), "ae_elements": ae_elements}
