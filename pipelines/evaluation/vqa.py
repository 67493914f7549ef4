"""VQA evaluation: batched greedy answers for a VQA-RAD / SLAKE / PathVQA-style set, resumable, then scoring."""

import os
import time

import torch
from tqdm.auto import tqdm

from ..medical_images import ImageLoadError
from .predictions import PredictionStore, load_run_config, open_run
from .records import load_vqa_records
from .runner import generate_answers, in_batches, model_for_run, open_rgb, run_device_dtype
from .summary import format_value, input_and_timing_lines, markdown_table, write_summary
from .vqa_scoring import aggregate_vqa_scores

DEFAULT_VQA_PROMPT = "{question}"
VQA_DEFINITIONS = {
    "closed_acc": "strict: first whole-word yes/no of the normalised prediction (or the whole normalised prediction "
    "for non-yes/no answers) equals the normalised answer; CLOSED questions",
    "closed_acc_llavamed": "LLaVA-Med v1.0.0 substring rule: ('yes' in pred or 'no' in pred) and answer in pred; "
    "CLOSED questions",
    "open_recall": "LLaVA-Med token recall (the 'open' column of LLaVA-Med tables); OPEN questions",
    "open_exact": "strict: normalised prediction == normalised answer; OPEN questions",
    "open_f1": "LLaVA-Med token F1 (tp counted with prediction counts); OPEN questions",
    "open_precision": "LLaVA-Med token precision; OPEN questions",
    "open_exact_llavamed": "LLaVA-Med 'exact match score': distinct answer words in pred / pred length; OPEN questions",
    "overall_acc": "strict, all questions: closed_acc hits on CLOSED + open_exact hits on OPEN, divided by n",
}
_MAIN_METRICS = ["closed_acc", "closed_acc_llavamed", "open_recall", "open_exact", "open_f1", "overall_acc"]
_COUNT_KEY = {"closed_acc": "n_closed", "closed_acc_llavamed": "n_closed", "overall_acc": "n"}


def score_vqa_predictions(predictions: list[dict]) -> dict:
    """Scores rows with `prediction`, `answer`, `answer_type`, `question_type`, `organ` (see `VQA_DEFINITIONS`)."""
    return aggregate_vqa_scores(predictions, group_keys=("question_type", "organ"))


def _vqa_markdown(result: dict) -> str:
    metrics = result["metrics"]
    overall = metrics["overall"]
    lines = [
        f"## VQA — {os.path.basename(result['data'])}",
        "",
        f"Checkpoint `{result['checkpoint']}`; {overall['n']} questions ({overall['n_closed']} closed, "
        f"{overall['n_open']} open); greedy decoding, max_new_tokens={result['settings']['max_new_tokens']}, "
        f"prompt template `{result['settings']['prompt_template']}`. Answers normalised with LLaVA-Med v1.0.0 "
        "`normalize_word`. Scores in %.",
        "",
        markdown_table(
            ["metric", "value", "n", "definition"],
            [
                [
                    name,
                    format_value(overall.get(name), 100),
                    overall[_COUNT_KEY.get(name, "n_open")],
                    VQA_DEFINITIONS[name],
                ]
                for name in _MAIN_METRICS
            ],
        ),
    ]
    for group in ("question_type", "organ"):
        rows = [
            [value, block["n"], block["n_closed"], block["n_open"]]
            + [format_value(block.get(name), 100) for name in _MAIN_METRICS]
            for value, block in metrics[f"by_{group}"].items()
        ]
        if rows:
            lines += [
                "",
                f"### By {group.replace('_', ' ')}",
                "",
                markdown_table([group, "n", "closed", "open"] + _MAIN_METRICS, rows),
            ]
    lines += input_and_timing_lines(result, "answers")
    return "\n".join(lines)


def evaluate_vqa(
    checkpoint: str,
    data: str,
    output_dir: str,
    image_dir: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    prompt_template: str = DEFAULT_VQA_PROMPT,
    limit: int | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    model=None,
    processor=None,
) -> dict:
    """Answers every question of `data` with the checkpoint, appending to `output_dir/predictions.jsonl` (items
    already there are skipped), then scores all of them and writes `metrics.json` and `summary.md`.

    Args:
        checkpoint: converted UniMedVL folder (ignored for loading when `model` and `processor` are given).
        data: JSON / JSONL VQA file (see `records.load_vqa_records`); `image_dir` defaults to `<data dir>/images`.
        prompt_template: format string with `{question}`.
        model, processor: an already loaded model and processor (e.g. in a notebook or a test).
    Returns:
        the result dict saved as `metrics.json` (`metrics`, `definitions`, `input`, `settings`, `timing`, paths).
    """
    start = time.perf_counter()
    records, data_report = load_vqa_records(data, image_dir, limit)
    _, torch_dtype = run_device_dtype(model, device, dtype)
    settings = {
        "task": "vqa",
        "checkpoint": os.path.abspath(checkpoint),
        "data": os.path.abspath(data),
        "prompt_template": prompt_template,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "dtype": str(torch_dtype),
    }
    store = open_run(output_dir, settings, overwrite)
    todo = [record for record in records if record["id"] not in store]
    resumed = len(records) - len(todo)
    torch.manual_seed(seed)
    model, processor = model_for_run(model, processor, todo, checkpoint, device, dtype)
    for batch in tqdm(in_batches(todo, batch_size), desc="VQA", unit="batch", disable=not progress):
        readable = []
        for record in batch:
            try:
                readable.append((record, open_rgb(record["image"])))
            except (ImageLoadError, OSError) as error:
                data_report.skip("unreadable_image", f"{record['image']} ({error})")
        if not readable:
            continue
        prompts = [prompt_template.format(question=record["question"]) for record, _ in readable]
        answers = generate_answers(model, processor, [[image] for _, image in readable], prompts, max_new_tokens)
        store.add([dict(record, prediction=answer) for (record, _), answer in zip(readable, answers)])
    scored = [store.items[record["id"]] for record in records if record["id"] in store]
    data_report.rows_kept = len(scored)
    result = {
        "task": "vqa",
        "checkpoint": settings["checkpoint"],
        "data": settings["data"],
        "settings": settings,
        "metrics": score_vqa_predictions(scored),
        "definitions": VQA_DEFINITIONS,
        "input": data_report.to_dict(),
        "timing": {"wall_s": time.perf_counter() - start, "generated": len(todo), "resumed": resumed},
        "predictions": store.path,
    }
    result["files"] = write_summary(output_dir, result, _vqa_markdown(result))
    return result


def rescore_vqa(predictions_path: str, output_dir: str | None = None) -> dict:
    """Scores an existing `predictions.jsonl` without a model; writes `metrics.json` / `summary.md` to `output_dir`
    (default: the predictions' folder)."""
    start = time.perf_counter()
    store = PredictionStore(predictions_path)
    if not store.items:
        raise ValueError(f"{predictions_path} holds no predictions.")
    items = list(store.items.values())
    settings = {"checkpoint": "unknown", "max_new_tokens": "unknown", "prompt_template": "unknown"}
    settings.update(load_run_config(os.path.dirname(os.path.abspath(predictions_path))))
    result = {
        "task": "vqa",
        "checkpoint": settings["checkpoint"],
        "data": predictions_path,
        "settings": settings,
        "metrics": score_vqa_predictions(items),
        "definitions": VQA_DEFINITIONS,
        "input": store.input_report(),
        "timing": {"wall_s": time.perf_counter() - start, "generated": 0, "resumed": len(items)},
        "predictions": predictions_path,
    }
    result["files"] = write_summary(
        output_dir or os.path.dirname(os.path.abspath(predictions_path)), result, _vqa_markdown(result)
    )
    return result


__all__ = ["DEFAULT_VQA_PROMPT", "VQA_DEFINITIONS", "evaluate_vqa", "rescore_vqa", "score_vqa_predictions"]
