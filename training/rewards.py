"""Verifiable medical rewards for `trl.GRPOTrainer`, scored exactly like the evaluation harness scores answers.

TRL calls a reward function as `reward(prompts=..., completions=..., **columns)`, with one value per completion and the
dataset's other columns (here `answer`, `answer_type`) as lists. A reward returns `None` for the rows it does not
judge; TRL then leaves it out of that row's weighted sum.

- `closed_answer_reward`: 1.0 when the answer of a closed question (yes/no, modality, plane, body region) is right
  under the harness's strict rule (`unimedvl_pipelines.evaluation.vqa_scoring.closed_hit`: first yes/no word for
  yes/no questions, the whole normalised answer otherwise), else 0.0;
- `open_answer_reward`: token F1 between the normalised completion and answer of an open question
  (`token_precision_recall_f1`, the harness's LLaVA-Med definition);
- `format_reward` (optional): 1.0 for a non-empty single-line answer of at most `max_words` words, else 0.0.
"""

from unimedvl_pipelines.evaluation.vqa_scoring import closed_hit, normalize_answer, token_precision_recall_f1


def completion_text(completion) -> str:
    """The text of one completion: a string (standard format) or a list of chat messages (conversational)."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content", "")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [part.get("text", "") for part in content if part.get("type") == "text"]
    return " ".join(parts)


def closed_answer_reward(completions, answer, answer_type, **kwargs) -> list[float | None]:
    """Exact-match reward of closed questions; `None` for open ones."""
    return [
        float(closed_hit(normalize_answer(completion_text(c)), normalize_answer(str(a)))) if t == "CLOSED" else None
        for c, a, t in zip(completions, answer, answer_type)
    ]


def open_answer_reward(completions, answer, answer_type, **kwargs) -> list[float | None]:
    """Token-F1 reward of open questions; `None` for closed ones."""
    rewards = []
    for completion, gold, kind in zip(completions, answer, answer_type):
        if kind == "CLOSED":
            rewards.append(None)
            continue
        _, _, f1 = token_precision_recall_f1(normalize_answer(completion_text(completion)), normalize_answer(str(gold)))
        rewards.append(f1)
    return rewards


def format_reward(completions, max_words: int = 8, **kwargs) -> list[float]:
    """1.0 for a non-empty one-line answer of at most `max_words` words, else 0.0."""
    rewards = []
    for completion in completions:
        text = completion_text(completion).strip()
        rewards.append(float(bool(text) and "\n" not in text and len(text.split()) <= max_words))
    return rewards


MEDICAL_REWARDS = {"closed": closed_answer_reward, "open": open_answer_reward, "format": format_reward}
"""Reward functions by name (the `rewards` setting of the GRPO recipe)."""


__all__ = ["MEDICAL_REWARDS", "closed_answer_reward", "completion_text", "format_reward", "open_answer_reward"]
