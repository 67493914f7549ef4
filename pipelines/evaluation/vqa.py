"""VQA evaluation: batched greedy answers for a VQA-RAD / SLAKE / PathVQA-style set, resumable, then scoring."""

import os
import time

import torch

from .predictions import PredictionStore, load_run_config
from .records import load_vqa_records
from .runner import answer_records, kept_predictions, model_for_run, start_run
from .summary import format_value, input_and_timing_lines, markdown_table, run_timing, save_result
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
    fields = {"prompt_template": prompt_template, "max_new_tokens": max_new_tokens, "seed": seed}
    settings, store = start_run("vqa", checkpoint, data, output_dir, fields, model, device, dtype, overwrite)
    todo = [record for record in records if not store.finished(record["id"])]
    torch.manual_seed(seed)
    model, processor = model_for_run(model, processor, todo, checkpoint, device, dtype)

    def prompt_of(record: dict) -> str:
        return prompt_template.format(question=record["question"])

    answer_records(
        model, processor, store, todo, data_report, "image", prompt_of, max_new_tokens, batch_size, "VQA", progress
    )
    scored = kept_predictions(store, records, data_report)
    metrics = score_vqa_predictions(scored)
    timing = run_timing(start, len(todo), len(records) - len(todo))
    return save_result(
        output_dir, _vqa_markdown, "vqa", settings, metrics, data_report.to_dict(), timing, store.path, VQA_DEFINITIONS
    )


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
    metrics = score_vqa_predictions(items)
    timing = run_timing(start, 0, len(items))
    output_dir = output_dir or os.path.dirname(os.path.abspath(predictions_path))
    return save_result(
        output_dir, _vqa_markdown, "vqa", settings, metrics, store.input_report(), timing, predictions_path,
        VQA_DEFINITIONS, data=predictions_path,
    )


__all__ = ["DEFAULT_VQA_PROMPT", "VQA_DEFINITIONS", "evaluate_vqa", "rescore_vqa", "score_vqa_predictions"]
