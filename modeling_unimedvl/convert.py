"""Converts an original UniMedVL / BAGEL release folder into a UniMedVL transformers folder.

    python -m modeling_unimedvl.convert ORIGINAL_DIR OUTPUT_DIR [--dtype bfloat16|float32] [--max-shard-size 2GB]

The original folder holds `ema.safetensors` (the model, BAGEL key names), `ae.safetensors` (the FLUX VAE, BFL key
names), `llm_config.json`, `vit_config.json`, the Qwen2 tokenizer files and, for non-FLUX VAE geometries,
`ae_params.json`. Every size is read from the folder. Tensors are streamed one at a time into sharded safetensors, so
the 29 GB release converts within a few GiB of memory. Key sets and shapes are checked before anything is written.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile

import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file
from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, SiglipVisionConfig
from transformers.dynamic_module_utils import custom_object_save

from .configuration_unimedvl import FLUX_VAE_CONFIG, UniMedVLConfig
from .image_processing_unimedvl import UniMedVLImageProcessor
from .modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLPositionTable
from .processing_unimedvl import UniMedVLProcessor
from .safetensors_reader import CheckpointError, SafetensorsReader


ORIGINAL_KEY_RENAMES = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vit_model\.vision_model\.", "model.vision_tower."),
    (r"^connector\.", "model.connector."),
    (r"^(vit_pos_embed|latent_pos_embed)\.", r"model.\1."),
    (r"^time_embedder\.mlp\.0\.", "model.time_embedder.linear_1."),
    (r"^time_embedder\.mlp\.2\.", "model.time_embedder.linear_2."),
    (r"^vae2llm\.", "model.vae2llm."),
    (r"^llm2vae\.", "llm2vae."),
)
"""Original `ema.safetensors` key (regex) → key in this package's layout; tensors are copied unchanged."""

REQUIRED_FILES = ("ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json")
EXTRA_SPECIAL_TOKENS = ("<|image_pad|>", "<|latent_pad|>")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
MAX_LISTED_KEYS = 10


def rename_original_key(key: str) -> str | None:
    for pattern, replacement in ORIGINAL_KEY_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    return None


def parse_size(size: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"Cannot parse shard size {size!r}; use e.g. '2GB' or '500MB'.")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)])


def _read_json(path: str) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}).") from error


def check_original_folder(original_dir: str) -> None:
    missing = [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(original_dir, name))]
    has_tokenizer = os.path.isfile(os.path.join(original_dir, "tokenizer.json")) or all(
        os.path.isfile(os.path.join(original_dir, name)) for name in ("vocab.json", "merges.txt")
    )
    if not has_tokenizer:
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise CheckpointError(
            f"{original_dir} is not an original UniMedVL release folder: missing {', '.join(missing)}. "
            "Download the complete release (ema.safetensors, ae.safetensors, llm_config.json, vit_config.json and "
            "the tokenizer files)."
        )


def build_config(original_dir: str, ema: SafetensorsReader, dtype: torch.dtype) -> UniMedVLConfig:
    """The config, reproducing the original loader: qk-norm and untied embeddings forced, one ViT layer fewer than
    `vit_config.json`, table sizes read from the checkpoint."""
    llm = _read_json(os.path.join(original_dir, "llm_config.json"))
    for key in ("architectures", "auto_map", "qk_norm", "layer_module", "freeze_und", "_attn_implementation", "bos_token_id", "eos_token_id"):
        llm.pop(key, None)
    llm["tie_word_embeddings"] = False
    text_config = Qwen2Config(**llm)

    vit = _read_json(os.path.join(original_dir, "vit_config.json"))
    vit.pop("rope", None)
    vit["num_hidden_layers"] -= 1
    position_rows = ema.shape("vit_model.vision_model.embeddings.position_embedding.weight")[0]
    vit["image_size"] = math.isqrt(position_rows) * vit.get("patch_size", 14)
    vision_config = SiglipVisionConfig(**vit)

    vae_config = dict(FLUX_VAE_CONFIG)
    params_path = os.path.join(original_dir, "ae_params.json")
    if os.path.isfile(params_path):
        params = _read_json(params_path)
        vae_config.update(
            block_out_channels=[params["ch"] * m for m in params["ch_mult"]],
            layers_per_block=params["num_res_blocks"],
            latent_channels=params["z_channels"],
            in_channels=params["in_channels"],
            out_channels=params["out_ch"],
            down_block_types=["DownEncoderBlock2D"] * len(params["ch_mult"]),
            up_block_types=["UpDecoderBlock2D"] * len(params["ch_mult"]),
            scaling_factor=params["scale_factor"],
            shift_factor=params["shift_factor"],
        )
    latent_side = math.isqrt(ema.shape("latent_pos_embed.pos_embed")[0])
    vit_side = math.isqrt(ema.shape("vit_pos_embed.pos_embed")[0])
    text_config.dtype = vision_config.dtype = dtype
    return UniMedVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        vae_config=vae_config,
        max_latent_size=latent_side,
        vit_max_num_patch_per_side=vit_side,
        dtype=dtype,
    )


def load_tokenizer(original_dir: str, config: UniMedVLConfig):
    """The release tokenizer plus the two placeholder tokens; sets the config's special-token ids from it."""
    # Prompts are left-padded: the processor does so, and pipelines batch with the tokenizer's padding side.
    tokenizer = AutoTokenizer.from_pretrained(original_dir, padding_side="left")
    missing = [token for token in EXTRA_SPECIAL_TOKENS if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = {}
    for name, token in (
        ("bos_token_id", "<|im_start|>"),
        ("eos_token_id", "<|im_end|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"),
        ("latent_token_id", "<|latent_pad|>"),
    ):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise CheckpointError(f"The tokenizer in {original_dir} has no {token} token (required by UniMedVL).")
        ids[name] = token_id
    if len(tokenizer) > config.text_config.vocab_size:
        raise CheckpointError(
            f"The tokenizer has {len(tokenizer)} tokens but the language model only {config.text_config.vocab_size} "
            "embeddings; the tokenizer does not belong to this checkpoint."
        )
    for name, value in ids.items():
        setattr(config, name, value)
    config.pad_token_id = tokenizer.pad_token_id
    text = config.text_config
    text.bos_token_id, text.eos_token_id, text.pad_token_id = ids["bos_token_id"], ids["eos_token_id"], tokenizer.pad_token_id
    return tokenizer


def _describe_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f" … (+{len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else "")


def check_keys_and_shapes(name: str, source: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """Raises a `CheckpointError` naming every missing, unexpected or mis-shaped key of `source` (our names)."""
    problems = []
    missing = expected.keys() - source.keys()
    unexpected = source.keys() - expected.keys()
    if missing:
        problems.append(f"{len(missing)} missing keys: {_describe_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_describe_keys(unexpected)}")
    wrong = [f"{k}: expected {list(expected[k])}, found {list(source[k])}" for k in sorted(source.keys() & expected.keys()) if tuple(source[k]) != tuple(expected[k])]
    if wrong:
        problems.append(f"{len(wrong)} tensors with wrong shapes: " + "; ".join(wrong[:MAX_LISTED_KEYS]))
    if problems:
        raise CheckpointError(
            f"{name} does not match the UniMedVL architecture described by its config files:\n  - "
            + "\n  - ".join(problems)
            + "\nCheck that ema.safetensors, llm_config.json and vit_config.json come from the same release; variants "
            "trained with extra modules (e.g. vae_model.* or vae_batch_norm.*) are not supported."
        )


def original_key_map(ema: SafetensorsReader) -> tuple[dict[str, str], list[str]]:
    """`{our key: original key}` and the original keys that have no counterpart."""
    mapping, unknown = {}, []
    for key in ema.keys():
        target = rename_original_key(key)
        if target is None:
            unknown.append(key)
        else:
            mapping[target] = key
    return mapping, unknown


def convert_vae(ae: SafetensorsReader, config: UniMedVLConfig) -> dict[str, torch.Tensor]:
    """BFL-layout VAE tensors → diffusers `AutoencoderKL` tensors under `model.vae.`."""
    state = {key.removeprefix("module."): ae.get_tensor(key) for key in ae.keys()}
    converted = convert_ldm_vae_checkpoint(state, config.vae_config)
    return {f"model.vae.{key}": value for key, value in converted.items()}


def check_position_table(name: str, table: torch.Tensor) -> None:
    grid = math.isqrt(table.shape[0])
    reference = UniMedVLPositionTable(grid, table.shape[1]).compute_table()
    tolerance = 1e-2 if table.dtype in (torch.bfloat16, torch.float16) else 1e-4
    error = (table.float() - reference).abs().max().item()
    if error > tolerance:
        raise CheckpointError(
            f"The stored {name} differs from the 2-D sin-cos table of a {grid}x{grid} grid by {error:.3g}; "
            "the checkpoint is corrupt or uses an unknown position scheme."
        )


class ShardWriter:
    """Collects tensors into `model-XXXXX-of-YYYYY.safetensors` shards of at most `max_bytes` each."""

    def __init__(self, output_dir: str, max_bytes: int):
        self.output_dir, self.max_bytes = output_dir, max_bytes
        self.current, self.current_bytes, self.shards, self.total = {}, 0, [], 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self.flush()
        self.current[key] = tensor.contiguous()
        self.current_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.current:
            return
        path = os.path.join(self.output_dir, f"shard-{len(self.shards):05d}.tmp")
        save_file(self.current, path, metadata={"format": "pt"})
        self.shards.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        count, weight_map = len(self.shards), {}
        for index, (path, keys) in enumerate(self.shards):
            name = "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(path, os.path.join(self.output_dir, name))
            weight_map.update({key: name for key in keys})
        if count > 1:
            index_path = os.path.join(self.output_dir, "model.safetensors.index.json")
            with open(index_path, "w") as handle:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}, handle, indent=2)


def convert_checkpoint(
    original_dir: str,
    output_dir: str,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "2GB",
    dry_run: bool = False,
) -> str:
    """Converts `original_dir` (original release layout) into `output_dir`; returns `output_dir`.

    `dry_run=True` validates files, configs, tokenizer, key sets and shapes without reading the model weights or writing.
    """
    check_original_folder(original_dir)
    ema = SafetensorsReader(os.path.join(original_dir, "ema.safetensors"))
    ae = SafetensorsReader(os.path.join(original_dir, "ae.safetensors"))
    mapping, unknown = original_key_map(ema)
    for required in ("vit_model.vision_model.embeddings.position_embedding.weight", "latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"):
        if required not in ema.entries:
            raise CheckpointError(f"{ema.path} has no {required}; it is not a UniMedVL/BAGEL checkpoint.")
    config = build_config(original_dir, ema, dtype)
    tokenizer = load_tokenizer(original_dir, config)

    with torch.device("meta"):
        model = UniMedVLForConditionalGeneration(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected_llm = {k: v for k, v in expected.items() if not k.startswith("model.vae.")}
    source = {target: ema.shape(original) for target, original in mapping.items()}
    source.update({f"<unmapped> {key}": ema.shape(key) for key in unknown})
    check_keys_and_shapes(ema.path, source, expected_llm)
    vae_tensors = convert_vae(ae, config)
    expected_vae = {k: v for k, v in expected.items() if k.startswith("model.vae.")}
    check_keys_and_shapes(ae.path, {k: tuple(v.shape) for k, v in vae_tensors.items()}, expected_vae)
    if dry_run:
        return output_dir

    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=output_dir)
    try:
        writer = ShardWriter(staging, parse_size(max_shard_size))
        for target in sorted(mapping):
            tensor = ema.get_tensor(mapping[target])
            if target.endswith("pos_embed.pos_embed"):
                check_position_table(mapping[target], tensor)
            writer.add(target, tensor.to(dtype))
            del tensor
        for key in sorted(vae_tensors):
            writer.add(key, vae_tensors.pop(key).to(dtype))
        writer.finish()
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o644)
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    config.architectures = ["UniMedVLForConditionalGeneration"]
    custom_object_save(model, output_dir, config=config)
    config.save_pretrained(output_dir)
    generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
        max_new_tokens=512,
    )
    generation_config.save_pretrained(output_dir)
    processor = UniMedVLProcessor(UniMedVLImageProcessor(), tokenizer, latent_downsample=config.latent_downsample)
    processor.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="unimedvl-convert", description="Convert an original UniMedVL/BAGEL release folder to the UniMedVL transformers layout."
    )
    parser.add_argument("original_dir", help="folder with ema.safetensors, ae.safetensors, llm_config.json, vit_config.json, tokenizer files")
    parser.add_argument("output_dir", help="folder to write (config.json, sharded safetensors, processor, code)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the written weights")
    parser.add_argument("--max-shard-size", default="2GB", help="largest shard, e.g. 2GB or 500MB")
    parser.add_argument("--dry-run", action="store_true", help="only validate the original folder")
    args = parser.parse_args(argv)
    try:
        convert_checkpoint(args.original_dir, args.output_dir, DTYPES[args.dtype], args.max_shard_size, args.dry_run)
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{'validated' if args.dry_run else 'converted'} {args.original_dir} -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["convert_checkpoint", "rename_original_key", "ORIGINAL_KEY_RENAMES", "main"]
