"""Command line of the UniMedVL curriculum (one stage or all three in order).

    python -m unimedvl_training.train --stage all --config my_data.yaml --model path/to/UniMedVL --output runs/unimedvl
    accelerate launch --config_file training/accelerate_configs/single_gpu.yaml -m unimedvl_training.train --stage 2 ...

Each stage writes `OUTPUT/stage{N}/checkpoint-*` while training and `OUTPUT/stage{N}/final/` when done; the next stage
starts from that folder. Re-running the same command resumes an interrupted stage and skips finished ones.
"""

import argparse
import logging
import os
import sys

import yaml

from .curriculum import STAGES, run_curriculum


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m unimedvl_training.train", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, choices=[*map(str, STAGES), "all"], help="stage to run, or all three")
    parser.add_argument("--config", default=None, help="YAML with `data:` sources and overrides (see curriculum.py)")
    parser.add_argument("--model", required=True, help="converted UniMedVL folder to start from")
    parser.add_argument("--output", required=True, help="output folder (one sub-folder per stage)")
    parser.add_argument("--max-steps", type=int, default=None, help="override max_steps of every stage")
    parser.add_argument("--use-cpu", action="store_true", help="train on the CPU")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--lora", default=None, help="comma-separated LoRA presets (und, gen, both, vision, heads)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--qlora", action="store_true", help="LoRA on 4-bit NF4 base weights (bitsandbytes)")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    return parser.parse_args(argv)


def _user_config(path: str | None, max_steps: int | None) -> dict:
    """The user YAML as a dict; `max_steps` (if given) replaces every stage's step count."""
    config = {}
    if path:
        with open(path) as handle:
            config = yaml.safe_load(handle) or {}
    if max_steps is not None:
        config.setdefault("training", {})["max_steps"] = max_steps
        for stage_config in (config.get("stages") or {}).values():
            (stage_config or {}).get("training", {}).pop("max_steps", None)
    return config


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    stages = list(STAGES) if args.stage == "all" else [int(args.stage)]
    user_config = _user_config(args.config, args.max_steps)
    finals = run_curriculum(
        stages,
        user_config,
        args.model,
        args.output,
        use_cpu=args.use_cpu,
        bf16=args.bf16,
        lora=args.lora.split(",") if args.lora else None,
        lora_rank=args.lora_rank,
        qlora=args.qlora,
        resume=not args.no_resume,
    )
    for stage, final in zip(stages, finals):
        print(f"stage {stage}: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
