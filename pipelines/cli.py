"""The `unimedvl` command line.

    unimedvl ask IMAGE "question" [--model PATH]          # VQA about an image (PNG/JPEG/TIFF/DICOM/NIfTI)
    unimedvl report IMAGE [--model PATH]                  # a radiology-style report
    unimedvl generate "prompt" -o out.png [--model PATH]  # text-to-image
    unimedvl edit IMAGE "instruction" -o out.png [--model PATH]   # editing, SR, T2→FLAIR, H&E→IHC, counterfactuals
    unimedvl convert ORIGINAL_DIR OUTPUT_DIR            # original release → transformers folder

Common options: `--model` (default: the environment variable UNIMEDVL_MODEL, else the shipped UniMedVL-Tiny),
`--device` (cpu, cuda, cuda:1, mps, auto = device_map="auto"; checked against this machine), `--dtype`,
`--load-in-4bit` / `--load-in-8bit`, `--seed`; image options `--window` (preset, `center,width` or `minmax`), `--slice`, `--axis`;
generation options `--steps`, `--height`, `--width`, `--guidance-scale`. Bad input (missing file, unreadable image,
bad option) ends with exit status 2 (usage) or 1 (input) and a one-line `unimedvl: error: …` message.

`unimedvl eval {vqa,report,generation,i2i} --data ... --output-dir ... [--model PATH]` evaluates a checkpoint (see
`unimedvl_pipelines.evaluation`). `unimedvl --version` prints the versions of the package and its key libraries.

Extending: every sub-command is a `register_*(subparsers)` function in `SUBCOMMANDS` that adds its parser and sets
`handler=fn(args) -> int`. The model option (`add_model_path_option`), its resolution (`resolve_model_path`) and the
shared argument types (`device_name`, `positive_int`, `finite_float`, `seed_value`, `output_image_path`) live in
`cli_arguments`, so `eval` and every other sub-command take them the same way. Generated images are written atomically.

Errors the package anticipates end with one line naming the file / option and a non-zero status; any other exception
also ends with one line (its type and message) unless the environment variable UNIMEDVL_TRACEBACK=1 asks for the
traceback.
"""

import argparse
import os
import sys

import torch
from modeling_unimedvl.atomic_files import save_image as save_image_atomically

from .cli_arguments import (
    TORCH_DTYPES,
    OneLineArgumentParser,
    VersionAction,
    add_model_path_option,
    check_device_available,
    device_name,
    finite_float,
    non_negative_float,
    output_image_path,
    positive_int,
    resolve_model_path,
    seed_value,
)
from .evaluation.cli import register_eval_command


REPORT_PROMPT = (
    "Please analyze this medical image using professional medical knowledge and provide a detailed radiological "
    "report with findings and diagnostic opinions."
)
DTYPES = {"auto": "auto", **TORCH_DTYPES}


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def parse_window(text: str | None):
    """`--window` value → preset name, "minmax" or a `(center, width)` pair."""
    if text is None or "," not in text:
        return text
    try:
        center, width = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid window {text!r}: use a preset, 'minmax' or CENTER,WIDTH") from None
    return center, width


# ------------------------------------------------------------------------------------------------------ loading


def load_pipeline(args):
    """The `UniMedVLPipeline` (model, processor, scheduler) with the requested device, dtype and quantization."""
    from modeling_unimedvl.safetensors_reader import CheckpointError

    from .pipeline_unimedvl import UniMedVLPipeline

    check_device_available(args.device)
    path = resolve_model_path(args.model)
    quantized = args.load_in_4bit or args.load_in_8bit
    kwargs = {"dtype": DTYPES[args.dtype]}
    if quantized:
        from .quantization import bnb_config

        compute = torch.float32 if args.dtype in ("auto", "float32") else DTYPES[args.dtype]
        kwargs["quantization_config"] = bnb_config(bits=4 if args.load_in_4bit else 8, compute_dtype=compute)
        kwargs["device_map"] = "auto" if args.device == "auto" else args.device
    elif args.device == "auto":
        kwargs["device_map"] = "auto"
    try:
        pipe = UniMedVLPipeline.from_pretrained(path, **kwargs)
    except (CheckpointError, CommandError, ImportError):
        raise
    except Exception as error:  # transformers / safetensors / torch raise many types for unusable folders
        raise CommandError(f"{path}: cannot load the model ({type(error).__name__}: {one_line(error)}).") from None
    if args.load_in_4bit:
        from .quantization import cpu_4bit_problems

        problems = cpu_4bit_problems(pipe.model)
        if problems:
            raise CommandError(
                "--load-in-4bit cannot run this model on the CPU: bitsandbytes' CPU kernel needs quantized layers whose "
                f"input size is a multiple of the block size and output size a multiple of 32, and {problems[0]} is not "
                f"({len(problems)} such layers). Use a CUDA GPU (--device cuda), --load-in-8bit or no quantization."
            )
    if args.device != "auto" and not quantized:
        pipe = pipe.to(args.device)
    return pipe


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def load_input_image(args):
    from .medical_images import load_medical_image

    return load_medical_image(args.image, window=args.window, slice_index=args.slice, axis=args.axis)


def generator(args) -> torch.Generator:
    return torch.Generator().manual_seed(args.seed)


# ------------------------------------------------------------------------------------------------------ commands


def answer(args, prompt: str) -> int:
    image = load_input_image(args)
    pipe = load_pipeline(args)
    torch.manual_seed(args.seed)
    inputs = pipe.processor(images=image, text=prompt).to(pipe.model.device)
    sampling = {"do_sample": args.temperature > 0}
    if args.temperature > 0:
        sampling["temperature"] = args.temperature
    generated = pipe.model.generate(**inputs, max_new_tokens=args.max_new_tokens, **sampling)
    print(pipe.processor.decode_answers(generated[:, inputs["input_ids"].shape[1] :])[0])
    return 0


def run_ask(args) -> int:
    return answer(args, args.question)


def run_report(args) -> int:
    return answer(args, args.prompt)


def save_image(image, path: str) -> None:
    """Writes `image` to `path` atomically (a temporary name renamed into place: never a partial file)."""
    try:
        save_image_atomically(image, path)
    except (OSError, ValueError) as error:
        raise CommandError(f"{path}: cannot write the image ({one_line(error)}).") from None
    print(f"wrote {path}")


def generation_kwargs(args) -> dict:
    kwargs = {"num_inference_steps": args.steps, "height": args.height, "width": args.width, "generator": generator(args)}
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    return kwargs


def run_generate(args) -> int:
    pipe = load_pipeline(args)
    save_image(pipe(args.prompt, **generation_kwargs(args)).images[0], args.output)
    return 0


def run_edit(args) -> int:
    from .pipeline_unimedvl import UniMedVLImg2ImgPipeline

    image = load_input_image(args)
    pipe = UniMedVLImg2ImgPipeline.from_pipe(load_pipeline(args))
    kwargs = generation_kwargs(args)
    if args.image_guidance_scale is not None:
        kwargs["image_guidance_scale"] = args.image_guidance_scale
    result = pipe(args.instruction, image=image, understanding_first=args.understanding_first, **kwargs)
    if result.text:
        print(f"understanding: {result.text[0]}")
    save_image(result.images[0], args.output)
    return 0


def run_convert(args) -> int:
    from modeling_unimedvl.convert import main as convert_main

    return convert_main(args.convert_args, prog="unimedvl")


# ------------------------------------------------------------------------------------------------------ parsers


def add_model_options(parser) -> None:
    group = parser.add_argument_group("model")
    add_model_path_option(group)
    group.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda, cuda:N, mps or auto (device_map='auto'); default cpu")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weights dtype (default: as saved)")
    bits = group.add_mutually_exclusive_group()
    bits.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 quantization")
    bits.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit quantization")
    group.add_argument("--seed", type=seed_value, default=0, help="random seed, 0 … 2**64-1 (default 0)")


def add_image_options(parser) -> None:
    group = parser.add_argument_group("input image")
    group.add_argument("image", help="PNG/JPEG/TIFF (8/16-bit), DICOM or NIfTI file")
    group.add_argument("--window", type=parse_window, help="CT window preset (lung, bone, brain, …), CENTER,WIDTH or minmax")
    group.add_argument("--slice", type=int, help="slice / frame / page of a volume or stack (default: middle)")
    group.add_argument("--axis", default="axial", help="NIfTI slicing axis: axial, coronal, sagittal (default axial)")


def add_text_options(parser) -> None:
    parser.add_argument("--max-new-tokens", type=positive_int, default=512, help="answer length limit (default 512)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="sampling temperature; 0 = greedy (default)")


def add_generation_options(parser) -> None:
    parser.add_argument("-o", "--output", type=output_image_path, required=True, help="output image file (PNG recommended)")
    parser.add_argument("--steps", type=int, default=50, help="schedule points (default 50 → 49 model steps)")
    parser.add_argument("--height", type=int, help="output height, multiple of 16")
    parser.add_argument("--width", type=int, help="output width, multiple of 16")
    parser.add_argument("--guidance-scale", type=finite_float, help="text guidance scale (default 4.0)")


def register_ask(subparsers) -> None:
    parser = subparsers.add_parser("ask", help="answer a question about an image")
    add_image_options(parser)
    parser.add_argument("question", help="the question")
    add_text_options(parser)
    add_model_options(parser)
    parser.set_defaults(handler=run_ask)


def register_report(subparsers) -> None:
    parser = subparsers.add_parser("report", help="write a report about an image")
    add_image_options(parser)
    parser.add_argument("--prompt", default=REPORT_PROMPT, help="the report instruction")
    add_text_options(parser)
    add_model_options(parser)
    parser.set_defaults(handler=run_report)


def register_generate(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate an image from a description")
    parser.add_argument("prompt", help="the description")
    add_generation_options(parser)
    add_model_options(parser)
    parser.set_defaults(handler=run_generate)


def register_edit(subparsers) -> None:
    parser = subparsers.add_parser("edit", help="generate an image from an image and an instruction")
    add_image_options(parser)
    parser.add_argument("instruction", help="the instruction (edit, super-resolve, translate modality or stain, …)")
    add_generation_options(parser)
    parser.add_argument("--image-guidance-scale", type=finite_float, help="image guidance scale (default 2.0)")
    parser.add_argument("--understanding-first", action="store_true", help="answer the instruction first and append the answer (UniMedVL's editing flow)")
    add_model_options(parser)
    parser.set_defaults(handler=run_edit)


def register_convert(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert an original release folder (see `unimedvl convert -h`)", add_help=False)
    parser.add_argument("convert_args", nargs=argparse.REMAINDER, help="arguments of modeling_unimedvl.convert")
    parser.set_defaults(handler=run_convert)


SUBCOMMANDS = (register_ask, register_report, register_generate, register_edit, register_eval_command, register_convert)
"""Sub-command registration functions, in `--help` order; add yours here."""


def build_parser(subcommands=SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="unimedvl", description="UniMedVL: medical image understanding and generation.")
    parser.add_argument("--version", action=VersionAction, help="print the versions of unimedvl and its key libraries")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineArgumentParser)
    for register in subcommands:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "convert":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.convert_args = args.convert_args + extra  # `convert` forwards its options (and -h) to the converter
    from .medical_images import ImageLoadError

    try:
        return args.handler(args)
    except (CommandError, ImageLoadError, FileNotFoundError, ImportError, ValueError, OSError) as error:
        print(f"unimedvl: error: {one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:
        if os.environ.get("UNIMEDVL_TRACEBACK") == "1":
            raise
        print(
            f"unimedvl: error: {type(error).__name__}: {one_line(error)} (set UNIMEDVL_TRACEBACK=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["SUBCOMMANDS", "build_parser", "main"]
