"""Offline evaluation of UniMedVL checkpoints (docs/evaluation.md): VQA, report generation, text-to-image and
image-to-image metrics, each batched, seeded, resumable, and summarised as `metrics.json` + `summary.md`."""

from .cli import register_eval_command
from .generation import evaluate_generation, score_generation
from .i2i import evaluate_i2i, rescore_i2i, score_i2i_pairs
from .image_metrics import fid_kid_from_features, ms_ssim_diversity, psnr_ssim
from .report import evaluate_report, rescore_report
from .text_metrics import bleu_scores, cider_d_scores, meteor_score, rouge_l_score, score_reports, tokenize_report
from .vqa import evaluate_vqa, rescore_vqa, score_vqa_predictions
from .vqa_scoring import aggregate_vqa_scores, normalize_answer, score_vqa_item

__all__ = [
    "register_eval_command",
    "evaluate_vqa",
    "rescore_vqa",
    "score_vqa_predictions",
    "aggregate_vqa_scores",
    "normalize_answer",
    "score_vqa_item",
    "evaluate_report",
    "rescore_report",
    "score_reports",
    "tokenize_report",
    "bleu_scores",
    "rouge_l_score",
    "meteor_score",
    "cider_d_scores",
    "evaluate_generation",
    "score_generation",
    "fid_kid_from_features",
    "ms_ssim_diversity",
    "evaluate_i2i",
    "rescore_i2i",
    "score_i2i_pairs",
    "psnr_ssim",
]
