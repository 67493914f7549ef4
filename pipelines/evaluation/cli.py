"""`unimedvl eval {vqa,report,generation,i2i} --data ... --output-dir ... [--model PATH]` and
`python -m unimedvl_pipelines.evaluation ...`.

The model is given as in every other `unimedvl` sub-command: `--model PATH` (default: $UNIMEDVL_MODEL, else the shipped
UniMedVL-Tiny, via `modeling_unimedvl.resolve_model_path`).
"""

import argparse
import os
import sys

from ..cli_arguments import (
    TORCH_DTYPES,
    OneLineArgumentParser,
    add_model_path_option,
    check_device_available,
    device_name,
    finite_float,
    non_negative_float,
    positive_int,
    resolve_model_path,
    seed_value,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RUN_OPTIONS = ("image_dir", "batch_size", "limit", "seed", "device", "dtype", "overwrite")
"""Options of `_add_common` that every task's `evaluate_*` function takes as keyword arguments of the same name."""
SAMPLING_OPTIONS = (
    "num_inference_steps", "cfg_text_scale", "cfg_interval", "cfg_renorm_type", "cfg_renorm_min", "timestep_shift"
)
"""Options of `_add_sampling` (all but `--cfg-img-scale`, which only i2i has) that the image tasks take by name."""
TASK_OPTIONS = {
    "vqa": ("max_new_tokens", "prompt_template"),
    "report": ("max_images", "max_new_tokens", "prompt", "wordnet_dir"),
    "generation": (
        "feature_extractor", "inception_weights", "samples_per_prompt", "height", "width", "feature_image_size",
        "kid_subset_size", "kid_subsets", "ms_ssim_scales", *SAMPLING_OPTIONS,
    ),
    "i2i": ("cfg_img_scale", "vae_encode", "crop_border", *SAMPLING_OPTIONS),
}
"""Each task's own options, which its `evaluate_*` function takes as keyword arguments of the same name."""


def _add_common(parser: argparse.ArgumentParser, batch_size: int) -> None:
    add_model_path_option(parser)
    parser.add_argument("--data", help="evaluation set, JSON or JSONL")
    parser.add_argument("--output-dir", help="folder for predictions.jsonl, run_config.json, metrics.json, summary.md")
    parser.add_argument("--predictions", help="re-score an existing predictions.jsonl instead of running the model")
    parser.add_argument("--image-dir", help="folder of the images named in --data (default: <data folder>/images)")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first N valid rows")
    parser.add_argument("--seed", type=seed_value, default=0)
    parser.add_argument("--device", type=device_name, default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", *TORCH_DTYPES])
    parser.add_argument("--overwrite", action="store_true", help="delete earlier predictions in --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_sampling(parser: argparse.ArgumentParser, cfg_img_scale: float | None, cfg_interval, renorm: str) -> None:
    parser.add_argument("--num-inference-steps", type=positive_int, default=50)
    parser.add_argument("--cfg-text-scale", type=finite_float, default=4.0)
    if cfg_img_scale is not None:
        parser.add_argument("--cfg-img-scale", type=finite_float, default=cfg_img_scale)
    parser.add_argument("--cfg-interval", type=finite_float, nargs=2, default=cfg_interval, metavar=("LOW", "HIGH"))
    parser.add_argument("--cfg-renorm-type", default=renorm, choices=["global", "channel", "text_channel"])
    parser.add_argument("--cfg-renorm-min", type=non_negative_float, default=0.0)
    parser.add_argument("--timestep-shift", type=finite_float, default=3.0)


def register_eval_command(subparsers) -> argparse.ArgumentParser:
    """Adds `eval` with the sub-tasks `vqa`, `report`, `generation`, `i2i` to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint (VQA, reports, generation, image-to-image)",
        description="Offline evaluation of a UniMedVL checkpoint; see docs/evaluation.md.",
    )
    tasks = parser.add_subparsers(dest="eval_task", required=True)

    vqa = tasks.add_parser("vqa", help="closed/open VQA accuracy (VQA-RAD, SLAKE, PathVQA JSON/JSONL)")
    _add_common(vqa, batch_size=8)
    vqa.add_argument("--max-new-tokens", type=positive_int, default=32)
    vqa.add_argument("--prompt-template", default="{question}", help="format string with {question}")

    report = tasks.add_parser("report", help="BLEU-1..4, ROUGE-L, METEOR, CIDEr-D on image + report pairs")
    _add_common(report, batch_size=4)
    report.add_argument("--max-new-tokens", type=positive_int, default=128)
    report.add_argument("--prompt", default="Describe the findings of this medical image.")
    report.add_argument("--max-images", type=positive_int, default=1, help="images per case for MedPix findings rows")
    report.add_argument("--wordnet-dir", help="local WordNet dict folder for METEOR (else nltk's data path)")

    generation = tasks.add_parser("generation", help="FID / KID per modality and MS-SSIM diversity of text-to-image")
    _add_common(generation, batch_size=4)
    _add_sampling(generation, None, [0.4, 1.0], "global")
    generation.add_argument("--height", type=positive_int, default=512)
    generation.add_argument("--width", type=positive_int, default=512)
    generation.add_argument("--samples-per-prompt", type=positive_int, default=1)
    generation.add_argument(
        "--feature-extractor", help="package.module:factory returning an nn.Module [N,3,S,S] -> [N,d]"
    )
    generation.add_argument(
        "--inception-weights", help="local torch-fidelity Inception-v3 weights (needs torch-fidelity)"
    )
    generation.add_argument("--feature-image-size", type=positive_int, default=299)
    generation.add_argument("--kid-subset-size", type=positive_int, default=1000)
    generation.add_argument("--kid-subsets", type=positive_int, default=100)
    generation.add_argument("--ms-ssim-scales", type=positive_int, default=5)

    i2i = tasks.add_parser("i2i", help="PSNR / SSIM of image-to-image outputs against targets")
    _add_common(i2i, batch_size=4)
    _add_sampling(i2i, 2.0, [0.0, 1.0], "text_channel")
    i2i.add_argument("--vae-encode", default="mean", choices=["mean", "sample"])
    i2i.add_argument("--crop-border", type=int, default=0, help="pixels removed from every border before PSNR/SSIM")

    parser.set_defaults(handler=run_eval_command)
    return parser


def evaluate_kwargs(args) -> dict:
    """Keyword arguments of the `evaluate_*` function of `args.eval_task`: the parsed options of the same names
    (`RUN_OPTIONS`, `TASK_OPTIONS`), `--cfg-interval` as a tuple and `progress` (not `--no-progress`)."""
    kwargs = {name: getattr(args, name) for name in RUN_OPTIONS + TASK_OPTIONS[args.eval_task]}
    if "cfg_interval" in kwargs:
        kwargs["cfg_interval"] = tuple(kwargs["cfg_interval"])
    return dict(kwargs, progress=not args.no_progress)


def run_eval_command(args) -> int:
    """Runs the parsed `eval` command and prints its Markdown summary; returns the exit status 0."""
    from .generation import evaluate_generation
    from .i2i import evaluate_i2i, rescore_i2i
    from .report import evaluate_report, rescore_report
    from .vqa import evaluate_vqa, rescore_vqa

    if args.predictions:
        if args.eval_task == "vqa":
            result = rescore_vqa(args.predictions, args.output_dir)
        elif args.eval_task == "report":
            result = rescore_report(args.predictions, args.output_dir, args.wordnet_dir)
        elif args.eval_task == "i2i":
            result = rescore_i2i(args.predictions, args.output_dir, args.crop_border)
        else:
            raise ValueError(
                "eval generation re-scores by rerunning with the same --output-dir (finished images are reused)."
            )
    else:
        missing = [flag for flag, value in (("--data", args.data), ("--output-dir", args.output_dir)) if not value]
        if missing:
            raise ValueError(
                f"eval {args.eval_task}: missing {', '.join(missing)} (or pass --predictions to re-score)."
            )
        check_device_available(args.device)
        args.checkpoint = resolve_model_path(args.model)
        evaluate = {
            "vqa": evaluate_vqa,
            "report": evaluate_report,
            "generation": evaluate_generation,
            "i2i": evaluate_i2i,
        }[args.eval_task]
        result = evaluate(args.checkpoint, args.data, args.output_dir, **evaluate_kwargs(args))
    with open(result["files"]["summary"], encoding="utf-8") as handle:
        print(handle.read())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m unimedvl_pipelines.evaluation {vqa,report,generation,i2i} ...`."""
    parser = OneLineArgumentParser(prog="python -m unimedvl_pipelines.evaluation")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineArgumentParser)
    register_eval_command(subparsers)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.handler(args)
    except (FileNotFoundError, ValueError, ImportError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "RUN_OPTIONS",
    "SAMPLING_OPTIONS",
    "TASK_OPTIONS",
    "register_eval_command",
    "evaluate_kwargs",
    "run_eval_command",
    "main",
]
