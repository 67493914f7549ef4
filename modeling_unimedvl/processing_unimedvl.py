"""Processor of UniMedVL: builds the original role-free sequence format with image blocks from prompts and images."""

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin


IMAGE_PLACEHOLDER = "<image>"

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer.\n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in your mind, and then generate the image.\n"
    "The planning process is enclosed within <think> </think> tags; that is, <think> planning process here </think> "
    "image here.\n"
)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}<|im_start|>{{ message['content'] }}<|im_end|>"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<image>"
    "{%- elif item['type'] == 'text' -%}<|im_start|>{{ item['text'] }}<|im_end|>{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>{%- endif -%}"
)
"""UniMedVL has no role tags: every text item is one `<|im_start|> … <|im_end|>` segment, images stand where they are."""


class UniMedVLProcessor(ProcessorMixin):
    r"""
    Turns prompts and images into UniMedVL inputs.

    A plain prompt becomes `[image blocks] <|im_start|> prompt <|im_end|>` (images first, or where `<image>` stands in
    the prompt; each piece of text around an `<image>` becomes its own segment), followed by the generation prompt
    `<|im_start|>` in text mode. A prompt that already holds `<|im_start|>` (e.g. from the chat template) is used as
    it is, with `<image>` placeholders expanded. In text mode an image block is `<|vision_start|>` + one placeholder
    per ViT patch + `<|vision_end|>`; in image mode a conditioning image becomes a VAE block (one placeholder per
    latent token) followed by a ViT block. Batches are left-padded.

    Args:
        image_processor ([`UniMedVLImageProcessor`]): resizing and patching.
        tokenizer: the Qwen2 tokenizer holding `<|im_start|>`, `<|im_end|>`, `<|vision_start|>`, `<|vision_end|>`,
            `<|image_pad|>` and `<|latent_pad|>`.
        latent_downsample (`int`): pixels per latent token side (16).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, latent_downsample: int = 16, **kwargs):
        if chat_template is None:
            chat_template = CHAT_TEMPLATE
        self.latent_downsample = latent_downsample
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {token} token; convert the checkpoint with modeling_unimedvl.convert.")
        return token_id

    @property
    def special_ids(self) -> dict[str, int]:
        names = {
            "bos": "<|im_start|>",
            "eos": "<|im_end|>",
            "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>",
            "image": "<|image_pad|>",
            "latent": "<|latent_pad|>",
        }
        return {key: self._token_id(token) for key, token in names.items()}

    def format_prompt(self, prompt: str, num_images: int, generation_mode: str, think: bool) -> str:
        """A plain prompt in the sequence format, with `<image>` placeholders for images that it does not place."""
        if not prompt.strip() and num_images == 0:
            raise ValueError("Empty prompt: give a question, an instruction or at least one image.")
        missing = num_images - prompt.count(IMAGE_PLACEHOLDER)
        if missing < 0:
            raise ValueError(f"The prompt has {prompt.count(IMAGE_PLACEHOLDER)} <image> placeholders but {num_images} images were given.")
        pieces = (IMAGE_PLACEHOLDER * missing + prompt).split(IMAGE_PLACEHOLDER)
        parts = []
        for index, piece in enumerate(pieces):
            if index > 0:
                parts.append(IMAGE_PLACEHOLDER)
            if piece.strip():
                parts.append(f"<|im_start|>{piece}<|im_end|>")
        if think:
            system = GEN_THINK_SYSTEM_PROMPT if generation_mode == "image" else VLM_THINK_SYSTEM_PROMPT
            parts.insert(0, f"<|im_start|>{system}<|im_end|>")
        if generation_mode == "text":
            parts.append("<|im_start|>")
        return "".join(parts)

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        generation_mode: str = "text",
        think: bool = False,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Returns `input_ids`, `attention_mask` `[batch, seq]`, and for images `pixel_values` / `image_grid_hw`
        (ViT) and, in image mode, `vae_pixel_values` (a list of `[3, H, W]` tensors)."""
        if generation_mode not in ("text", "image"):
            raise ValueError(f"Unsupported generation_mode {generation_mode!r}: UniMedVL generates 'text' or 'image'.")
        if text is None:
            text = ""
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts:
            raise ValueError("No prompt given.")
        images_per_prompt = _split_images(images, prompts)
        ids = self.special_ids
        sequences, all_images = [], []
        for prompt, prompt_images in zip(prompts, images_per_prompt):
            formatted = prompt
            if "<|im_start|>" not in prompt:
                formatted = self.format_prompt(prompt, len(prompt_images), generation_mode, think)
            if formatted.count(IMAGE_PLACEHOLDER) != len(prompt_images):
                raise ValueError(
                    f"The prompt has {formatted.count(IMAGE_PLACEHOLDER)} <image> placeholders but "
                    f"{len(prompt_images)} images were given."
                )
            sequences.append(formatted)
            all_images.extend(prompt_images)

        mode = "generation" if generation_mode == "image" else "understanding"
        image_inputs = self.image_processor(all_images, mode=mode) if all_images else {}
        grids = image_inputs.get("image_grid_hw", torch.zeros(0, 2, dtype=torch.long)).tolist()
        vae_pixels = image_inputs.get("vae_pixel_values", [])
        token_rows, image_index = [], 0
        for formatted in sequences:
            row = []
            for index, piece in enumerate(formatted.split(IMAGE_PLACEHOLDER)):
                if index > 0:
                    if vae_pixels:
                        height, width = vae_pixels[image_index].shape[-2:]
                        latent_tokens = (height // self.latent_downsample) * (width // self.latent_downsample)
                        row += [ids["vision_start"]] + [ids["latent"]] * latent_tokens + [ids["vision_end"]]
                    vit_tokens = grids[image_index][0] * grids[image_index][1]
                    row += [ids["vision_start"]] + [ids["image"]] * vit_tokens + [ids["vision_end"]]
                    image_index += 1
                if piece:
                    row += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            token_rows.append(row)

        length = max(len(row) for row in token_rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(token_rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_rows), length), dtype=torch.long)
        for row_index, row in enumerate(token_rows):
            if row:
                input_ids[row_index, length - len(row) :] = torch.tensor(row)
                attention_mask[row_index, length - len(row) :] = 1
        data = {"input_ids": input_ids, "attention_mask": attention_mask, **image_inputs}
        return BatchFeature(data=data)

    def decode_answers(self, generated_ids: torch.Tensor) -> list[str]:
        """Answers from generated ids `[batch, n]`: the text before the first `<|im_end|>`, special tokens removed."""
        eos = self.special_ids["eos"]
        answers = []
        for row in generated_ids.tolist():
            if eos in row:
                row = row[: row.index(eos)]
            answers.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return answers

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs) -> list[str]:
        """Decodes whole sequences `[batch, n]` (prompt included), as the `image-text-to-text` pipeline expects."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_hw", "vae_pixel_values"]


def _split_images(images, prompts: list[str]) -> list[list]:
    """Images per prompt: nested lists as given; a flat list follows the prompts' `<image>` counts (or all to one prompt)."""
    if images is None:
        return [[] for _ in prompts]
    if not isinstance(images, (list, tuple)):
        images = [images]
    if images and all(isinstance(item, (list, tuple)) for item in images):
        if len(images) != len(prompts):
            raise ValueError(f"Got image lists for {len(images)} prompts but {len(prompts)} prompts.")
        return [list(item) for item in images]
    if len(prompts) == 1:
        return [list(images)]
    counts = [prompt.count(IMAGE_PLACEHOLDER) for prompt in prompts]
    if sum(counts) != len(images):
        raise ValueError(
            f"{len(images)} images for {len(prompts)} prompts with {sum(counts)} <image> placeholders: "
            "pass one list of images per prompt."
        )
    split, start = [], 0
    for count in counts:
        split.append(list(images[start : start + count]))
        start += count
    return split


__all__ = ["UniMedVLProcessor", "CHAT_TEMPLATE", "VLM_THINK_SYSTEM_PROMPT", "GEN_THINK_SYSTEM_PROMPT"]
