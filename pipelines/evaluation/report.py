"""Report generation evaluation: batched greedy reports for image + report pairs, resumable, then text metrics."""

import os
import time

import torch

from .predictions import PredictionStore, load_run_config
from .records import load_report_records
from .runner import answer_records, kept_predictions, model_for_run, start_run
from .summary import format_value, input_and_timing_lines, markdown_table, run_timing, save_result
from .text_metrics import score_reports

DEFAULT_REPORT_PROMPT = "Describe the findings of this medical image."
REPORT_DEFINITIONS = {
    "bleu_1": "corpus BLEU-1 (torchmetrics BLEUScore, no smoothing, one reference)",
    "bleu_2": "corpus BLEU-2, uniform weights over orders 1-2",
    "bleu_3": "corpus BLEU-3, uniform weights over orders 1-3",
    "bleu_4": "corpus BLEU-4, uniform weights over orders 1-4",
    "rouge_l": "mean ROUGE-L F1 (LCS, beta = 1; torchmetrics ROUGEScore)",
    "meteor": "mean nltk METEOR (alpha 0.9, beta 3, gamma 0.5; WordNet synonyms), not Java METEOR 1.5",
    "cider_d": "CIDEr-D (coco-caption definition, sigma 6, x10), idf from the evaluated references",
}
TOKENISATION = "lower-cased Python word tokens, punctuation removed (not the Java PTB tokenizer)"


def _report_markdown(result: dict) -> str:
    metrics = result["metrics"]
    meteor_note = metrics.get("meteor_unavailable")
    rows = []
    for name, definition in REPORT_DEFINITIONS.items():
        value = (
            "unavailable"
            if name == "meteor" and metrics["meteor"] is None
            else format_value(metrics[name], 100 if name != "cider_d" else 1)
        )
        rows.append(
            [name, value, metrics["n"], definition + (f" — {meteor_note}" if name == "meteor" and meteor_note else "")]
        )
    lines = [
        f"## Report generation — {os.path.basename(result['data'])}",
        "",
        f"Checkpoint `{result['checkpoint']}`; {metrics['n']} image/report pairs; greedy decoding, "
        f"max_new_tokens={result['settings']['max_new_tokens']}, prompt `{result['settings']['prompt']}`. "
        f"Tokenisation: {TOKENISATION}. BLEU / ROUGE-L / METEOR in %, CIDEr-D as is.",
        "",
        markdown_table(["metric", "value", "n", "definition"], rows),
        *input_and_timing_lines(result, "reports"),
    ]
    return "\n".join(lines)


def evaluate_report(
    checkpoint: str,
    data: str,
    output_dir: str,
    image_dir: str | None = None,
    max_images: int = 1,
    batch_size: int = 4,
    max_new_tokens: int = 128,
    prompt: str = DEFAULT_REPORT_PROMPT,
    wordnet_dir: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    model=None,
    processor=None,
) -> dict:
    """Generates a report per item of `data` (MedPix captions / findings or generic `id, image, report` rows),
    appending to `output_dir/predictions.jsonl` (finished items are skipped), then scores BLEU-1..4, ROUGE-L,
    CIDEr-D and METEOR (when a local WordNet exists) and writes `metrics.json` / `summary.md`."""
    start = time.perf_counter()
    records, data_report = load_report_records(data, image_dir, max_images=max_images, limit=limit)
    fields = {"prompt": prompt, "max_new_tokens": max_new_tokens, "max_images": max_images, "seed": seed}
    settings, store = start_run("report", checkpoint, data, output_dir, fields, model, device, dtype, overwrite)
    todo = [record for record in records if not store.finished(record["id"])]
    torch.manual_seed(seed)
    model, processor = model_for_run(model, processor, todo, checkpoint, device, dtype)
    answer_records(
        model, processor, store, todo, data_report, "images", lambda _: prompt, max_new_tokens, batch_size, "Reports",
        progress,
    )
    scored = kept_predictions(store, records, data_report)
    return _score_and_save(
        output_dir, settings, scored, wordnet_dir, data_report.to_dict(), start, len(todo), len(records) - len(todo),
        store.path,
    )


def _score_and_save(
    output_dir, settings, items, wordnet_dir, input_report, start, generated, resumed, predictions
) -> dict:
    """Scores the report rows `items` (`prediction`, `report`) and saves the result (`summary.save_result`)."""
    metrics = score_reports([item["prediction"] for item in items], [item["report"] for item in items], wordnet_dir)
    timing = run_timing(start, generated, resumed)
    definitions = dict(REPORT_DEFINITIONS, tokenisation=TOKENISATION)
    return save_result(
        output_dir, _report_markdown, "report", settings, metrics, input_report, timing, predictions, definitions
    )


def rescore_report(predictions_path: str, output_dir: str | None = None, wordnet_dir: str | None = None) -> dict:
    """Scores an existing report `predictions.jsonl` (`prediction`, `report` per line) without a model."""
    start = time.perf_counter()
    store = PredictionStore(predictions_path)
    items = list(store.items.values())
    settings = {"checkpoint": "unknown", "prompt": "unknown", "max_new_tokens": "unknown"}
    settings.update(load_run_config(os.path.dirname(os.path.abspath(predictions_path))), data=predictions_path)
    output_dir = output_dir or os.path.dirname(os.path.abspath(predictions_path))
    return _score_and_save(
        output_dir, settings, items, wordnet_dir, store.input_report(), start, 0, len(items), predictions_path
    )


__all__ = ["DEFAULT_REPORT_PROMPT", "REPORT_DEFINITIONS", "evaluate_report", "rescore_report"]
