"""Converts an original UniMedVL / BAGEL release folder into a UniMedVL transformers folder.

    python -m modeling_unimedvl.convert ORIGINAL_DIR OUTPUT_DIR [--dtype bfloat16|float32] [--max-shard-size 2GB]

The original folder holds `ema.safetensors` (the model, BAGEL key names), `ae.safetensors` (the FLUX VAE, BFL key
names), `llm_config.json`, `vit_config.json`, the Qwen2 tokenizer files and, for non-FLUX VAE geometries,
`ae_params.json`. Every size is read from the folder. Tensors are streamed one at a time into sharded safetensors, so
the 29 GB release converts within a few GiB of memory. Key sets and shapes are checked before anything is written, and
every tensor is checked for NaN / infinite values while it streams.

Everything is written into a staging folder next to OUTPUT_DIR that replaces it only when complete
(`atomic_files.staged_folder`): a killed conversion leaves OUTPUT_DIR as it was, and no earlier conversion's shards
survive. A non-empty OUTPUT_DIR is refused unless `--overwrite` is given; OUTPUT_DIR may not be (or contain) ORIGINAL_DIR.
"""

import argparse
import math
import os
import re
import sys

import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen2Config, SiglipVisionConfig
from transformers.dynamic_module_utils import custom_object_save

from .atomic_files import folder_is_empty, staged_folder, write_json
from .configuration_unimedvl import FLUX_VAE_CONFIG, UniMedVLConfig
from .image_processing_unimedvl import UniMedVLImageProcessor
from .loading_checks import check_tokenizer_files, non_finite_count, read_json_object
from .modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLPositionTable, original_generation_config
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
LLM_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
VIT_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")
POSITION_TABLES = (
    "vit_model.vision_model.embeddings.position_embedding.weight",
    "latent_pos_embed.pos_embed",
    "vit_pos_embed.pos_embed",
)
"""Tables whose row count (side²) sets a config size."""


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


def check_sizes(path: str, config: dict, keys: tuple[str, ...], minimum: dict[str, int] | None = None) -> None:
    """Raises a `CheckpointError` naming `path` and the key when a size of `keys` is absent from `config` or not an
    integer of at least 1 (or its `minimum`)."""
    absent = [key for key in keys if key not in config]
    if absent:
        raise CheckpointError(f"{path} has no {', '.join(absent)}.")
    for key in keys:
        value, lowest = config[key], (minimum or {}).get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            raise CheckpointError(f"{path}: {key} must be an integer >= {lowest}, got {value!r}.")


def table_side(ema: SafetensorsReader, key: str) -> int:
    """Side of the square grid of the position table `key` (its row count is side²)."""
    rows = ema.shape(key)[0] if ema.shape(key) else 0
    side = math.isqrt(rows)
    if rows < 1 or side * side != rows:
        raise CheckpointError(f"{ema.path}: {key} has {rows} rows; a position table has side² rows (side >= 1).")
    return side


def check_output_path(original_dir: str, output_dir: str, overwrite: bool) -> None:
    """Refuses an output that is the release folder (or holds it), a file, unwritable, or non-empty without overwrite."""
    original, output = os.path.realpath(original_dir), os.path.realpath(output_dir)
    if output == original or original.startswith(output.rstrip(os.sep) + os.sep):
        raise CheckpointError(
            f"The output folder {output_dir} is (or contains) the release folder {original_dir}; write the converted "
            "model to a new folder."
        )
    if os.path.exists(output) and not os.path.isdir(output):
        raise CheckpointError(f"The output path {output_dir} is a file; give a folder path.")
    if not overwrite and not folder_is_empty(output):
        raise CheckpointError(
            f"The output folder {output_dir} is not empty; pass --overwrite (overwrite=True) to replace it, or choose a "
            "new folder."
        )
    parent = os.path.dirname(output)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"Cannot write {output_dir}: {parent} is not a writable folder.")


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
    llm_path, vit_path = os.path.join(original_dir, "llm_config.json"), os.path.join(original_dir, "vit_config.json")
    llm = read_json_object(llm_path)
    check_sizes(llm_path, llm, LLM_SIZE_KEYS)
    for key in ("architectures", "auto_map", "qk_norm", "layer_module", "freeze_und", "_attn_implementation", "bos_token_id", "eos_token_id"):
        llm.pop(key, None)
    llm["tie_word_embeddings"] = False
    text_config = _build(llm_path, Qwen2Config, llm)

    vit = read_json_object(vit_path)
    check_sizes(vit_path, vit, VIT_SIZE_KEYS, {"num_hidden_layers": 2})
    vit.pop("rope", None)
    vit["num_hidden_layers"] -= 1
    vit["image_size"] = table_side(ema, POSITION_TABLES[0]) * vit["patch_size"]
    vision_config = _build(vit_path, SiglipVisionConfig, vit)

    vae_config = dict(FLUX_VAE_CONFIG)
    params_path = os.path.join(original_dir, "ae_params.json")
    if os.path.isfile(params_path):
        params = read_json_object(params_path)
        missing = [key for key in ("ch", "ch_mult", "num_res_blocks", "z_channels", "in_channels", "out_ch", "scale_factor", "shift_factor") if key not in params]
        if missing:
            raise CheckpointError(f"{params_path} has no {', '.join(missing)}.")
        check_sizes(params_path, params, ("ch", "num_res_blocks", "z_channels", "in_channels", "out_ch"))
        if not isinstance(params["ch_mult"], list) or not params["ch_mult"] or not all(isinstance(m, int) and m > 0 for m in params["ch_mult"]):
            raise CheckpointError(f"{params_path}: ch_mult must be a non-empty list of positive integers, got {params['ch_mult']!r}.")
        for key in ("scale_factor", "shift_factor"):
            if not isinstance(params[key], (int, float)) or not math.isfinite(params[key]):
                raise CheckpointError(f"{params_path}: {key} must be a finite number, got {params[key]!r}.")
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
    latent_side, vit_side = table_side(ema, POSITION_TABLES[1]), table_side(ema, POSITION_TABLES[2])
    text_config.dtype = vision_config.dtype = dtype
    return UniMedVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        vae_config=vae_config,
        max_latent_size=latent_side,
        vit_max_num_patch_per_side=vit_side,
        dtype=dtype,
    )


def _build(path: str, config_class, values: dict):
    """`config_class(**values)`, with type and value errors reported as a `CheckpointError` naming `path`."""
    try:
        return config_class(**values)
    except (TypeError, ValueError, ZeroDivisionError) as error:
        message = " ".join(str(error).split())
        raise CheckpointError(f"{path} does not describe a valid {config_class.__name__}: {message}") from None


def load_tokenizer(original_dir: str, config: UniMedVLConfig):
    """The release tokenizer plus the two placeholder tokens; sets the config's special-token ids from it."""
    check_tokenizer_files(original_dir)
    files = [name for name in ("tokenizer.json", "tokenizer_config.json") if os.path.isfile(os.path.join(original_dir, name))]
    if "tokenizer_config.json" in files:
        read_json_object(os.path.join(original_dir, "tokenizer_config.json"))
    # Prompts are left-padded: the processor does so, and pipelines batch with the tokenizer's padding side.
    try:
        tokenizer = AutoTokenizer.from_pretrained(original_dir, padding_side="left")
    except Exception as error:  # tokenizers / transformers raise many types for damaged files
        message = " ".join(str(error).split()) or type(error).__name__
        raise CheckpointError(
            f"The tokenizer files in {original_dir} ({', '.join(files) or 'vocab.json, merges.txt'}) cannot be loaded: {message}"
        ) from None
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
            f"{name} does not match the UniMedVL architecture described by its config files: "
            + "; ".join(problems)
            + ". Check that ema.safetensors, llm_config.json and vit_config.json come from the same release; variants "
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
    for key, tensor in state.items():
        check_finite(ae.path, key, tensor)
    try:
        converted = convert_ldm_vae_checkpoint(state, config.vae_config)
    except KeyError as error:
        raise CheckpointError(f"{ae.path} has no VAE tensor {error.args[0]}; it is not a complete FLUX-layout VAE.") from None
    return {f"model.vae.{key}": value for key, value in converted.items()}


def check_finite(path: str, key: str, tensor: torch.Tensor) -> None:
    """Raises a `CheckpointError` naming the file and tensor when a floating tensor holds NaN or infinite values."""
    count = non_finite_count(tensor)
    if count:
        raise CheckpointError(
            f"{path}: tensor {key} holds {count} NaN/infinite values; the file is corrupt. Download it again."
        )


def check_position_table(name: str, table: torch.Tensor) -> None:
    grid = math.isqrt(table.shape[0])
    reference = UniMedVLPositionTable(grid, table.shape[1]).compute_table()
    tolerance = 1e-2 if table.dtype in (torch.bfloat16, torch.float16) else 1e-4
    error = (table.float() - reference).abs().max().item()
    if not error <= tolerance:  # NaN fails too
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
            write_json(index_path, {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))})


def convert_checkpoint(
    original_dir: str,
    output_dir: str,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "2GB",
    dry_run: bool = False,
    overwrite: bool = False,
) -> str:
    """Converts `original_dir` (original release layout) into `output_dir`; returns `output_dir`.

    `dry_run=True` validates files, configs, tokenizer, key sets, shapes and the output path without reading the model
    weights or writing. The output is written to a staging folder that replaces `output_dir` once complete; a
    non-empty `output_dir` is refused unless `overwrite=True`.

    Raises:
        CheckpointError: a missing, damaged or mismatching release file (named with the key), or an unusable output.
    """
    check_original_folder(original_dir)
    check_output_path(original_dir, output_dir, overwrite)
    shard_bytes = parse_size(max_shard_size)
    ema = SafetensorsReader(os.path.join(original_dir, "ema.safetensors"))
    ae = SafetensorsReader(os.path.join(original_dir, "ae.safetensors"))
    mapping, unknown = original_key_map(ema)
    for required in POSITION_TABLES:
        if required not in ema.entries:
            raise CheckpointError(f"{ema.path} has no {required}; it is not a UniMedVL/BAGEL checkpoint.")
    config = build_config(original_dir, ema, dtype)
    tokenizer = load_tokenizer(original_dir, config)

    try:
        with torch.device("meta"):
            model = UniMedVLForConditionalGeneration(config)
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as error:
        message = " ".join(str(error).split())
        raise CheckpointError(f"llm_config.json / vit_config.json in {original_dir} describe no buildable model: {message}") from None
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

    try:
        with staged_folder(output_dir, overwrite=overwrite) as staging:
            write_converted_folder(staging, ema, mapping, vae_tensors, model, config, tokenizer, dtype, shard_bytes)
    except OSError as error:
        raise CheckpointError(f"Cannot write {output_dir}: {error.strerror or error} ({error.filename or output_dir}).") from None
    return output_dir


def write_converted_folder(folder, ema, mapping, vae_tensors, model, config, tokenizer, dtype, shard_bytes) -> None:
    """Streams the weights (checking each for non-finite values) and writes config, code, generation config and
    processor into `folder`."""
    writer = ShardWriter(folder, shard_bytes)
    for target in sorted(mapping):
        tensor = ema.get_tensor(mapping[target])
        check_finite(ema.path, mapping[target], tensor)
        if target.endswith("pos_embed.pos_embed"):
            check_position_table(mapping[target], tensor)
        writer.add(target, tensor.to(dtype))
        del tensor
    for key in sorted(vae_tensors):
        writer.add(key, vae_tensors.pop(key).to(dtype))
    writer.finish()

    config.architectures = ["UniMedVLForConditionalGeneration"]
    custom_object_save(model, folder, config=config)
    config.save_pretrained(folder)
    original_generation_config(config).save_pretrained(folder)
    processor = UniMedVLProcessor(UniMedVLImageProcessor(), tokenizer, latent_downsample=config.latent_downsample)
    processor.save_pretrained(folder)


def main(argv: list[str] | None = None, prog: str = "unimedvl-convert") -> int:
    """The converter's command line; errors are one line `PROG: error: …` with exit status 1."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Convert an original UniMedVL/BAGEL release folder to the UniMedVL transformers layout."
    )
    parser.add_argument("original_dir", help="folder with ema.safetensors, ae.safetensors, llm_config.json, vit_config.json, tokenizer files")
    parser.add_argument("output_dir", help="folder to write (config.json, sharded safetensors, processor, code)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the written weights")
    parser.add_argument("--max-shard-size", default="2GB", help="largest shard, e.g. 2GB or 500MB")
    parser.add_argument("--dry-run", action="store_true", help="only validate the original folder and the output path")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        convert_checkpoint(args.original_dir, args.output_dir, DTYPES[args.dtype], args.max_shard_size, args.dry_run, args.overwrite)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    print(f"{'validated' if args.dry_run else 'converted'} {args.original_dir} -> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["convert_checkpoint", "rename_original_key", "ORIGINAL_KEY_RENAMES", "main"]
