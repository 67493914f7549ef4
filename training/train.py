"""`unimedvl-train`: the UniMedVL curriculum (one stage or all three) and GRPO fine-tuning.

    unimedvl-train --stage all --config my_data.yaml --model path/to/UniMedVL --output runs/unimedvl
    unimedvl-train --stage 1 --config my_data.yaml --model ... --output ... --learning_rate 1e-4 --report_to wandb
    unimedvl-train --stage 1 ... --trainer-config sft.yaml     # TRL-style flat YAML of UniMedVLTrainingArguments
    unimedvl-train grpo --config grpo.yaml                      # see grpo.py (TrlParser YAML / flags)
    accelerate launch --config_file training/accelerate_configs/fsdp2.yaml -m unimedvl_training.train --stage 1 ...

Each stage writes `OUTPUT/stage{N}/checkpoint-*` while training and `OUTPUT/stage{N}/final/` when done; the next stage
starts from that folder. Re-running the same command resumes an interrupted stage and skips finished ones. Flags
after the curriculum's own are `UniMedVLTrainingArguments` / `trl.SFTConfig` fields (parsed by `trl.TrlParser`) and
override the `training` section of every stage. Configuration errors end with one line `unimedvl-train: error: …`
and exit status 2.
"""

import argparse
import logging
import os
import re
import sys

import yaml

from .curriculum import STAGES, run_curriculum


class ConfigError(ValueError):
    """A user configuration error, reported as one line."""


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="unimedvl-train", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, choices=[*map(str, STAGES), "all"], help="stage to run, or all three")
    parser.add_argument("--config", default=None, help="YAML with `data:` sources and overrides (see curriculum.py)")
    parser.add_argument("--trainer-config", default=None, help="TRL-style YAML of UniMedVLTrainingArguments fields")
    parser.add_argument("--model", required=True, help="converted UniMedVL folder to start from")
    parser.add_argument("--output", required=True, help="output folder (one sub-folder per stage)")
    parser.add_argument("--max-steps", type=int, default=None, help="override max_steps of every stage (> 0)")
    parser.add_argument("--use-cpu", action="store_true", help="train on the CPU")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--lora", default=None, help="comma-separated LoRA presets (und, gen, both, vision, heads)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--qlora", action="store_true", help="LoRA on 4-bit NF4 base weights (bitsandbytes)")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    args, remaining = parser.parse_known_args(argv)
    if args.max_steps is not None and args.max_steps <= 0:
        parser.error(f"--max-steps must be a positive number of optimizer steps, got {args.max_steps}")
    if args.lora_rank <= 0:
        parser.error(f"--lora-rank must be positive, got {args.lora_rank}")
    return args, remaining


def _read_yaml(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{what} {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{what} {path} must hold a YAML mapping, got {type(content).__name__}")
    return content


def trainer_overrides(remaining: list[str], trainer_config: str | None) -> dict:
    """`UniMedVLTrainingArguments` fields given on the command line or in a TRL-style YAML, parsed by `TrlParser`."""
    from trl import TrlParser

    from .trainer import UniMedVLTrainingArguments

    given = {re.sub(r"^--", "", item.split("=")[0]) for item in remaining if item.startswith("--")}
    strings = list(remaining)
    if trainer_config:
        given |= set(_read_yaml(trainer_config, "trainer config")) - {"env"}
        strings += ["--config", trainer_config]
    if not given:
        return {}
    parser = TrlParser(UniMedVLTrainingArguments, exit_on_error=False)
    try:
        (parsed,) = parser.parse_args_and_config(strings + ["--output_dir", "unused"])
    except (argparse.ArgumentError, ValueError, TypeError) as error:
        raise ConfigError(f"training arguments: {error}") from None
    unknown = sorted(name for name in given if not hasattr(parsed, name))
    if unknown:
        raise ConfigError(f"unknown training argument(s) {unknown}")
    return {name: getattr(parsed, name) for name in given if name != "output_dir"}


def user_config(path: str | None, max_steps: int | None, overrides: dict | None = None) -> dict:
    """The user YAML as a dict; `overrides` (training arguments) apply to every stage; `max_steps` (if given)
    replaces every stage's step count."""
    config = _read_yaml(path, "config") if path else {}
    for key, kind in (("data", dict), ("training", dict), ("stages", dict), ("image_transforms", dict)):
        if key in config and not isinstance(config[key], kind):
            raise ConfigError(f"config {path}: `{key}` must be a mapping, got {type(config[key]).__name__}")
    training = config.setdefault("training", {})
    training.update(overrides or {})
    if max_steps is not None:
        training["max_steps"] = max_steps
        for stage_config in (config.get("stages") or {}).values():
            (stage_config or {}).get("training", {}).pop("max_steps", None)
    return config


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["grpo"]:
        from .grpo import main as grpo_main

        return grpo_main(argv[1:])
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, remaining = parse_args(argv)
    stages = list(STAGES) if args.stage == "all" else [int(args.stage)]
    try:
        if not os.path.isdir(args.model):
            raise ConfigError(f"--model {args.model} is not a folder (a converted UniMedVL checkpoint)")
        config = user_config(args.config, args.max_steps, trainer_overrides(remaining, args.trainer_config))
        finals = run_curriculum(
            stages,
            config,
            args.model,
            args.output,
            use_cpu=args.use_cpu,
            bf16=args.bf16,
            lora=args.lora.split(",") if args.lora else None,
            lora_rank=args.lora_rank,
            qlora=args.qlora,
            resume=not args.no_resume,
        )
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"unimedvl-train: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    for stage, final in zip(stages, finals):
        print(f"stage {stage}: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
