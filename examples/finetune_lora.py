"""Fine-tune UniMedVL with LoRA (or QLoRA) on a folder of private images and a JSONL file of answers.

One JSONL line per sample, in UniMedVL's format (images resolve relative to --images):

    {"input_img": [{"path": "case1.png"}], "output_img": [],
     "message": [{"from": "human", "value": "<image>\\nWhat is the finding?"}, {"from": "gpt", "value": "Pneumothorax."}]}

Rows with `output_img` train image generation (text-to-image without `input_img`, image-to-image with it). Hugging
Face chat rows (`messages` with role / content parts, `images` or `image` columns) work too. Bad rows (missing or
unreadable images, empty answers, non-UTF-8 lines, …) are dropped and reported. Training runs on `UniMedVLTrainer`,
a `trl.SFTTrainer`: the LoRA adapter comes from `peft_config`; re-running the command resumes from the last
committed checkpoint.

    python examples/finetune_lora.py --model path/to/UniMedVL --jsonl train.jsonl --images images/ --output my-adapter \
        --preset und --steps 200 [--qlora] [--use-cpu] [--push-to-hub me/my-adapter]
"""

import argparse
import os

import torch
from transformers import set_seed

import modeling_unimedvl
from unimedvl_training import (
    CFGDropout,
    SequenceBuilder,
    UniMedVLTrainer,
    UniMedVLTrainingArguments,
    UniMedVLTrainingDataset,
    load_jsonl_records,
    load_quantized_model,
    lora_config,
    push_adapter_to_hub,
    validate_records,
)
from unimedvl_training.checkpoints import last_committed_checkpoint
from unimedvl_training.curriculum import training_processor
from unimedvl_training.lora import prepare_model_for_kbit_training


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="converted UniMedVL folder")
    parser.add_argument("--jsonl", required=True)
    parser.add_argument("--images", required=True, help="folder the image paths are relative to")
    parser.add_argument("--output", required=True)
    parser.add_argument("--preset", default="und", help="comma-separated presets: und, gen, both, vision, heads")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--max-side", type=int, default=None, help="train at a smaller resolution (long side in px)")
    parser.add_argument("--qlora", action="store_true", help="4-bit NF4 base weights (bitsandbytes)")
    parser.add_argument("--use-cpu", action="store_true")
    parser.add_argument("--pack-tokens", type=int, default=None, help="pack samples into rows of at most N tokens")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the adapter with a model card")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    set_seed(0)
    presets = args.preset.split(",")
    processor = modeling_unimedvl.UniMedVLProcessor.from_pretrained(args.model)
    transforms = None
    if args.max_side:
        side = args.max_side
        transforms = {
            "understanding": [side // 14 * 14, 28, 14, side * side],
            "generation_vit": [side // 14 * 14, 28, 14, side * side],
            "generation_vae": [side // 16 * 16, 32, 16, side * side],
        }
    builder = SequenceBuilder(training_processor(processor, transforms), CFGDropout())
    records, report = validate_records(load_jsonl_records(args.jsonl, args.images), length_fn=builder.num_tokens, max_tokens=17000)
    print(report.summary())

    if args.qlora:
        model = prepare_model_for_kbit_training(load_quantized_model(args.model), use_gradient_checkpointing=False)
    else:
        model = modeling_unimedvl.UniMedVLForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)

    training_args = UniMedVLTrainingArguments(
        output_dir=os.path.join(args.output, "checkpoints"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(20, args.steps // 10),
        logging_steps=max(1, args.steps // 20),
        save_steps=max(1, args.steps // 4),
        save_total_limit=2,
        use_cpu=args.use_cpu,
        bf16=torch.cuda.is_available() and not args.use_cpu,
        pack_tokens=args.pack_tokens,
        report_to=[],
    )
    trainer = UniMedVLTrainer(
        model=model,
        args=training_args,
        train_dataset=UniMedVLTrainingDataset(records, builder),
        processing_class=processor,
        peft_config=lora_config(presets, r=args.rank, lora_alpha=2 * args.rank),
    )
    trainer.model.print_trainable_parameters()
    trainer.train(resume_from_checkpoint=last_committed_checkpoint(training_args.output_dir))
    model = trainer.model
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    losses = [(e["step"], round(e["ce"], 3), round(e["mse"], 3)) for e in trainer.state.log_history if "ce" in e]
    print(f"(step, ce, mse): first {losses[0]}, last {losses[-1]}; adapter saved to {args.output}")
    if args.push_to_hub:
        url = push_adapter_to_hub(model, args.push_to_hub, presets, base_model=args.model,
                                  training_summary=f"{args.steps} steps on {report.kept} private samples")
        print(f"pushed: {url}")


if __name__ == "__main__":
    main()
