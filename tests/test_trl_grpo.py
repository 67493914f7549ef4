"""GRPO with verifiable medical rewards: the rewards score like the evaluation harness, `UniMedVLGRPOTrainer` gives
TRL the model's exact per-token log-probabilities for image prompts, and `unimedvl-train grpo` trains a few steps."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unimedvl_training.rewards import closed_answer_reward, format_reward, open_answer_reward


def test_rewards_score_like_the_harness():
    completions = ["Yes.", "no, there is none", "The CT", "MR", "left lung", "right lung", "", [{"role": "assistant", "content": "Yes"}]]
    answers = ["yes", "yes", "CT", "ct", "the left lung", "left lung", "liver", "yes"]
    kinds = ["CLOSED", "CLOSED", "CLOSED", "CLOSED", "OPEN", "OPEN", "OPEN", "CLOSED"]
    assert closed_answer_reward(completions, answer=answers, answer_type=kinds) == [1.0, 0.0, 1.0, 0.0, None, None, None, 1.0]
    assert open_answer_reward(completions, answer=answers, answer_type=kinds) == [None, None, None, None, 1.0, 0.5, 0.0, None]
    assert format_reward(["yes", "", "a b c d e f g h i", "two\nlines", " axial "]) == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_grpo_log_probs_equal_the_model_log_probs(tmp_path):
    from trl import GRPOConfig

    from modeling_unimedvl import UniMedVLForConditionalGeneration, UniMedVLProcessor
    from modeling_unimedvl.default_model import DEFAULT_MODEL_DIR
    from unimedvl_training.grpo import UniMedVLGRPOTrainer, question_row

    import datasets

    model = UniMedVLForConditionalGeneration.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    processor = UniMedVLProcessor.from_pretrained(DEFAULT_MODEL_DIR)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)) for size in ((112, 112, 3), (56, 112, 3))]
    dataset = datasets.Dataset.from_list([question_row(image, "Is this a CT?", "yes", "CLOSED", "modality") for image in images])
    trainer = UniMedVLGRPOTrainer(model=model, reward_funcs=closed_answer_reward, processing_class=processor, train_dataset=dataset,
                                  args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, num_generations=2,
                                                  per_device_train_batch_size=2, max_completion_length=3, report_to=[]))
    inputs = processor(images=[[image] for image in images], text=["Is this a CT?"] * 2)
    completion = torch.tensor([processor.tokenizer("yes", add_special_tokens=False)["input_ids"][:1] + [processor.special_ids["eos"]]] * 2)
    input_ids = torch.cat([inputs["input_ids"], completion], 1)
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(completion)], 1)
    grid = inputs["image_grid_hw"]
    assert grid.prod(-1).tolist()[0] != grid.prod(-1).tolist()[1]  # per-sample patch slicing matters
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, logits_to_keep=2, batch_size=1, pixel_values=inputs["pixel_values"],
            image_grid_thw=torch.cat([torch.ones_like(grid[:, :1]), grid], -1), num_images=[1, 1],
        )
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"], image_grid_hw=grid).logits
    expected = torch.log_softmax(logits[:, -3:-1], -1).gather(-1, completion[..., None])[..., 0]
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)


def test_grpo_command_trains_and_saves_adapter_and_merged_model(data_dir, tmp_path):
    from peft import AutoPeftModel

    from modeling_unimedvl import UniMedVLForConditionalGeneration
    from modeling_unimedvl.default_model import DEFAULT_MODEL_DIR
    from unimedvl_training.lora import load_adapter
    from unimedvl_training.train import main

    assert main(["grpo", "--data", str(data_dir), "--output_dir", str(tmp_path), "--limit", "8", "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--num_generations", "2", "--logging_steps", "1", "--save_steps", "100"]) == 0
    summary = json.loads((tmp_path / "grpo_summary.json").read_text())
    logs = [entry for entry in summary["log_history"] if "reward" in entry]
    assert [entry["step"] for entry in logs] == [1, 2] and summary["train_questions"] == 8
    assert all("rewards/closed_answer_reward/mean" in entry and "rewards/format_reward/mean" in entry for entry in logs)
    final = tmp_path / "final"
    merged = UniMedVLForConditionalGeneration.from_pretrained(final, dtype=torch.float32)
    adapter = load_adapter(UniMedVLForConditionalGeneration.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32), str(final / "adapter"))
    auto = AutoPeftModel.from_pretrained(final / "adapter", import_allowlist=["modeling_unimedvl"])
    ids = torch.tensor([[1, 20, 21, 22, 2, 1]])
    with torch.no_grad():
        torch.testing.assert_close(adapter.merge_and_unload()(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(auto(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("argv, message", [(["--max_steps", "0"], "--max_steps must be a positive number of optimizer steps, got 0"),
                                           (["--data", "/nonexistent"], "--data /nonexistent has no vqa_rad/ folder"),
                                           (["--rewards", "bleu"], "Unknown reward(s) ['bleu']")])
def test_grpo_command_errors_are_one_line(data_dir, tmp_path, capsys, argv, message):
    from unimedvl_training.train import main

    base = ["grpo", "--data", str(data_dir), "--output_dir", str(tmp_path), "--limit", "4", "--max_steps", "1"]
    assert main(base + argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("unimedvl-train grpo: error: ") and message in error[-1]
