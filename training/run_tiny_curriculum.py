"""All three curriculum stages and a LoRA run of the tiny reference model on real medical data, on the CPU.

    python -m unimedvl_training.run_tiny_curriculum --data ../shared/data --reference ../shared/reference/tiny_official \
        --output outputs/tiny_curriculum --steps 600

Data (read in place, never copied): VQA-RAD questions (`vqa_rad/trainset.json`, images `vqa_rad/images`) as
understanding samples; MedPix 2.0 captions (`medpix/descriptions_train.jsonl`, images `medpix/images`) as text-to-image
prompts; 2× super-resolution built from MedPix images (input: the image downscaled 2× and upscaled back; target: the
image) as the interleaved image-to-image task. The derived JSONL files and super-resolution inputs go to
`OUTPUT/data`. Prints the CE / MSE curves of every stage and the training throughput.
"""

import argparse
import json
import os

from PIL import Image


IMAGE_TRANSFORMS = {
    "understanding": [112, 56, 14, 112 * 112],
    "generation_vit": [112, 56, 14, 112 * 112],
    "generation_vae": [128, 64, 16, 128 * 128],
}
"""Small training resolutions: ViT images ≤ 112 px, generation images 64–128 px."""


def read_jsonl(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def sr_pair(source: str, out_dir: str, name: str, transform: tuple[int, int, int, int]) -> tuple[str, str]:
    """The 2× super-resolution pair of one image, written once to `out_dir`: `(input, target)` paths, where the target
    is the grey image at its generation size under `transform` (the processor's VAE transform) and the input is that
    image downscaled 2× and upscaled back (bicubic)."""
    from modeling_unimedvl.image_processing_unimedvl import target_size

    target_path = os.path.join(out_dir, f"{name}_hr.png")
    input_path = os.path.join(out_dir, f"{name}_lr.png")
    if not (os.path.isfile(target_path) and os.path.isfile(input_path)):
        with Image.open(source) as image:
            image = image.convert("L")
            size = target_size(*image.size, transform)
            target = image.resize(size, Image.BICUBIC)
        low = target.resize((size[0] // 2, size[1] // 2), Image.BICUBIC).resize(size, Image.BICUBIC)
        target.save(target_path)
        low.save(input_path)
    return input_path, target_path


def build_data(data_dir: str, out_dir: str, num_sr: int) -> dict:
    """Writes the three JSONL files (UniMedVL line format) and the super-resolution inputs; returns the `data:` config."""
    os.makedirs(os.path.join(out_dir, "sr"), exist_ok=True)
    with open(os.path.join(data_dir, "vqa_rad", "trainset.json")) as handle:
        vqa = json.load(handle)
    vqa_rows = [
        {
            "main_task_type": "understanding",
            "sub_task_type": "vqa",
            "input_img": [{"path": row["image_name"]}],
            "output_img": [],
            "message": [{"from": "human", "value": f"<image>\n{row['question']}"}, {"from": "gpt", "value": str(row["answer"])}],
        }
        for row in vqa
    ]
    medpix = read_jsonl(os.path.join(data_dir, "medpix", "descriptions_train.jsonl"))
    t2i_rows = [
        {
            "main_task_type": "generation",
            "sub_task_type": "t2i",
            "input_img": [],
            "output_img": [{"path": f"{row['image']}.png"}],
            "message": [{"from": "human", "value": f'Using the description "{row["Description"]["Caption"]}" generate a medical image.'}],
        }
        for row in medpix
        if (row.get("Description") or {}).get("Caption")
    ]
    sr_rows = []
    for row in medpix[:num_sr]:
        input_path, target_path = sr_pair(
            os.path.join(data_dir, "medpix", "images", f"{row['image']}.png"), os.path.join(out_dir, "sr"), row["image"],
            tuple(IMAGE_TRANSFORMS["generation_vae"]),
        )
        sr_rows.append(
            {
                "main_task_type": "image_editing",
                "sub_task_type": "super_resolution",
                "input_img": [{"path": input_path}],
                "output_img": [{"path": target_path}],
                "message": [
                    {"from": "human", "value": "<image>\nIncrease the resolution of this image by a factor of two."},
                    {"from": "gpt", "value": "Here is the super-resolved image."},
                ],
            }
        )
    return {
        "understanding": [{"jsonl": write_jsonl(os.path.join(out_dir, "vqa_rad.jsonl"), vqa_rows), "image_dir": os.path.join(data_dir, "vqa_rad", "images")}],
        "text_to_image": [{"jsonl": write_jsonl(os.path.join(out_dir, "medpix_t2i.jsonl"), t2i_rows), "image_dir": os.path.join(data_dir, "medpix", "images")}],
        "interleaved": [{"jsonl": write_jsonl(os.path.join(out_dir, "medpix_sr.jsonl"), sr_rows), "task": "image_to_image"}],
    }


def curve(log_history: list[dict], key: str, points: int = 6) -> list[tuple[int, float]]:
    values = [(entry["step"], entry[key]) for entry in log_history if key in entry and "train_runtime" not in entry]
    if len(values) <= points:
        return values
    stride = (len(values) - 1) / (points - 1)
    return [values[round(i * stride)] for i in range(points)]


def window_mean(log_history: list[dict], key: str, first: bool, size: int = 10) -> float | None:
    """Mean of the first / last `size` logged values of `key` (None for a run shorter than one logging interval)."""
    values = [entry[key] for entry in log_history if key in entry and "train_runtime" not in entry]
    chosen = values[:size] if first else values[-size:]
    return round(sum(chosen) / len(chosen), 4) if chosen else None


def summarize(name: str, final_dir: str) -> dict:
    with open(os.path.join(final_dir, "training_summary.json")) as handle:
        summary = json.load(handle)
    history = summary["log_history"]
    result = {"stage": name, "data": {g: {"kept": r["kept"], "dropped": r["dropped"]} for g, r in summary["data"].items()}}
    for key in ("ce", "mse", "loss"):
        result[key] = {
            "first10_mean": window_mean(history, key, True),
            "last10_mean": window_mean(history, key, False),
            "points": [(step, round(value, 4)) for step, value in curve(history, key)],
        }
    speeds = [entry["tokens_per_second"] for entry in history if "tokens_per_second" in entry]
    result["tokens_per_second_median"] = sorted(speeds)[len(speeds) // 2] if speeds else None
    result["train_runtime_s"] = next((entry["train_runtime"] for entry in history if "train_runtime" in entry), None)
    return result


def main(argv=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("UNIMEDVL_DATA_DIR", "../shared/data"))
    parser.add_argument("--reference", default="../shared/reference/tiny_official")
    parser.add_argument("--output", default="outputs/tiny_curriculum")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per stage")
    parser.add_argument("--lora-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--num-sr", type=int, default=200, help="number of MedPix super-resolution pairs")
    args = parser.parse_args(argv)

    import torch
    from modeling_unimedvl.convert import convert_checkpoint

    from .curriculum import load_stage_config, run_curriculum, run_stage

    args.output = os.path.abspath(args.output)
    model_dir = os.path.join(args.output, "model")
    if not os.path.isdir(model_dir):
        convert_checkpoint(args.reference, model_dir, dtype=torch.float32)
    data = build_data(args.data, os.path.join(args.output, "data"), args.num_sr)
    user_config = {
        "data": data,
        "image_transforms": IMAGE_TRANSFORMS,
        "max_tokens_per_sample": 1024,
        "training": {
            "max_steps": args.steps,
            "learning_rate": args.learning_rate,
            "warmup_steps": 10,
            "per_device_train_batch_size": args.batch_size,
            "save_steps": 100,
            "logging_steps": 10,
            "ema_decay": 0.99,
            "disable_tqdm": True,
        },
    }
    finals = run_curriculum([1, 2, 3], user_config, model_dir, args.output, use_cpu=True)
    lora_config = load_stage_config(3, user_config)
    lora_config["training"]["max_steps"] = args.lora_steps
    lora_final = run_stage(lora_config, model_dir, os.path.join(args.output, "lora_both"), use_cpu=True, lora=["both", "heads"], lora_rank=8)
    results = [summarize(f"stage{i + 1}", final) for i, final in enumerate(finals)] + [summarize("lora_both+heads", lora_final)]
    print(json.dumps(results, indent=1))
    with open(os.path.join(args.output, "curves.json"), "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
