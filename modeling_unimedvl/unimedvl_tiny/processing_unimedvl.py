"""Processor of UniMedVL: builds the original role-free sequence format with image blocks from prompts and images."""

import re

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin, Unpack

from .loading_checks import checked_processor_from_pretrained
from .safetensors_reader import CheckpointError  # what loading raises; a direct import, so that remote-code
# loaders which copy only a module's own relative imports (diffusers) bring this file along


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
    "{%- set items = [{'type': 'text', 'text': message['content']}] if message['content'] is string "
    "else message['content'] -%}"
    "{%- for item in items -%}"
    "{%- if item['type'] == 'image' -%}<image>"
    "{%- elif item['type'] == 'text' and message['role'] == 'assistant' -%}"
    "<|im_start|>{% generation %}{{ item['text'] }}<|im_end|>{% endgeneration %}"
    "{%- elif item['type'] == 'text' -%}<|im_start|>{{ item['text'] }}<|im_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>{%- endif -%}"
)
"""UniMedVL has no role tags: every text item is one `<|im_start|> … <|im_end|>` segment, images stand where they are.
The assistant's text and its closing `<|im_end|>` (what the model predicts) are marked as generation, so
`return_assistant_tokens_mask=True` (and TRL's `assistant_only_loss`) select exactly the answer tokens."""

GENERATION_MODES = ("text", "image")

FORMATTED_PROMPT = re.compile(
    r"(?:<image>|<\|im_start\|>(?:(?!<\|im_start\|>|<\|im_end\|>).)*<\|im_end\|>)+(?:<\|im_start\|>)?"
    r"|(?:<image>)+<\|im_start\|>",
    re.DOTALL,
)
"""A prompt in the sequence format (what `apply_chat_template(..., tokenize=False)` renders): whole
`<|im_start|> … <|im_end|>` segments and `<image>` placeholders, optionally ending with the generation prompt."""


class UniMedVLImagesKwargs(ImagesKwargs, total=False):
    """`mode`: how images enter the sequence, by default from `generation_mode`. `"understanding"` (text mode): a ViT
    block with the VQA transform, as the original's `Bagel.chat`; `"generation"` (image mode): a VAE block and a ViT
    block per image, as its `InterleaveInferencer` (also usable in text mode, as its `inference_ver=1` VQA);
    `"interleave_understanding"`: a ViT block of the image resized by the VAE-side transform first, as the
    `InterleaveInferencer`'s understanding output (the editing flow's answer step)."""

    mode: str


class UniMedVLProcessorKwargs(ProcessingKwargs, total=False):
    """Text keywords (`padding`, `padding_side`, `truncation`, `max_length`, `return_tensors`, …) go to the tokenizer;
    `generation_mode` (`"text"` or `"image"`) and `think` choose the sequence format."""

    images_kwargs: UniMedVLImagesKwargs
    generation_mode: str
    think: bool
    _defaults = {"text_kwargs": {"padding": True, "padding_side": "left", "return_tensors": "pt"}}


class UniMedVLProcessor(ProcessorMixin):
    r"""
    Turns prompts and images into UniMedVL inputs.

    A plain prompt is user text: it becomes `[image blocks] <|im_start|> prompt <|im_end|>` (images first, or where
    `<image>` stands in the prompt; each piece of text around an `<image>` becomes its own segment), followed by the
    generation prompt `<|im_start|>` in text mode, and its control tokens (`<|im_end|>`, `<|vision_start|>`, …) are
    encoded as plain text, so typed text can never close a turn or open an image block. A prompt that is already in
    the sequence format — whole `<|im_start|> … <|im_end|>` segments and `<image>` placeholders, as
    `apply_chat_template(..., tokenize=False)` renders it — is used as it is, with `<image>` placeholders expanded. In text mode an image block is `<|vision_start|>` + one `<|image_pad|>` per ViT patch +
    `<|vision_end|>`; in image mode a conditioning image becomes a VAE block (one `<|latent_pad|>` per latent token)
    followed by a ViT block. Batches are left-padded; tokenizer keywords (`padding`, `padding_side`, `truncation`,
    `max_length`, `return_tensors`) are honoured and unknown keywords are reported.

    Args:
        image_processor ([`UniMedVLImageProcessor`]): resizing and patching.
        tokenizer: the Qwen2 tokenizer holding `<|im_start|>`, `<|im_end|>`, `<|vision_start|>`, `<|vision_end|>`,
            `<|image_pad|>` and `<|latent_pad|>`.
        chat_template (`str`, *optional*): defaults to [`CHAT_TEMPLATE`].
        latent_downsample (`int`): pixels per latent token side (16).
    """

    valid_processor_kwargs = UniMedVLProcessorKwargs
    skip_tensor_conversion = ProcessorMixin.skip_tensor_conversion + ["vae_pixel_values"]
    image_token = IMAGE_PLACEHOLDER

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, latent_downsample: int = 16, **kwargs):
        if chat_template is None:
            chat_template = CHAT_TEMPLATE
        self.latent_downsample = latent_downsample
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        end = self.special_tokens["eos"]
        if tokenizer is not None and tokenizer.eos_token != end and end in tokenizer.get_vocab():
            # The model ends every text segment and every answer with <|im_end|>: the tokenizer says so too, so that
            # transformers' Trainer / TRL, which align the model's eos with the tokenizer's, keep the model's.
            tokenizer.eos_token = end

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`ProcessorMixin.from_pretrained` that refuses a missing or damaged tokenizer and non-positive image sizes
        with an error naming the file; see `loading_checks`.

        When this class itself runs as a folder's code (loaded as remote code, e.g. a component of
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, which does not pass that flag on), the
        folder's image processor is that same code and is trusted with it."""
        if not cls.__module__.startswith("modeling_unimedvl."):
            kwargs.setdefault("trust_remote_code", True)
        return checked_processor_from_pretrained(super().from_pretrained, pretrained_model_name_or_path, *args, **kwargs)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {token} token; convert the checkpoint with modeling_unimedvl.convert.")
        return token_id

    @property
    def special_tokens(self) -> dict[str, str]:
        """The control tokens of the sequence format by role."""
        return {
            "bos": "<|im_start|>",
            "eos": "<|im_end|>",
            "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>",
            "image": "<|image_pad|>",
            "latent": "<|latent_pad|>",
        }

    @property
    def special_ids(self) -> dict[str, int]:
        return {key: self._token_id(token) for key, token in self.special_tokens.items()}

    # ------------------------------------------------------------------------------------------------ prompts

    def prompt_messages(self, prompt: str, images: list, generation_mode: str, think: bool) -> list[dict]:
        """A plain prompt and its images as one chat (role-free in the sequence, so one user turn), with the think
        system prompt first when `think`; images go first unless `<image>` places them."""
        if not prompt.strip() and not images:
            raise ValueError("Empty prompt: give a question, an instruction or at least one image.")
        placed = prompt.count(IMAGE_PLACEHOLDER)
        if placed > len(images):
            raise ValueError(f"The prompt has {placed} <image> placeholders but {len(images)} images were given.")
        pieces = (IMAGE_PLACEHOLDER * (len(images) - placed) + prompt).split(IMAGE_PLACEHOLDER)
        content, remaining = [], iter(images)
        for index, piece in enumerate(pieces):
            if index > 0:
                content.append({"type": "image", "image": next(remaining)})
            if piece.strip():
                content.append({"type": "text", "text": piece})
        messages = [{"role": "user", "content": content}]
        if think:
            system = GEN_THINK_SYSTEM_PROMPT if generation_mode == "image" else VLM_THINK_SYSTEM_PROMPT
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return messages

    def format_prompt(self, prompt: str, num_images: int, generation_mode: str, think: bool) -> str:
        """A plain prompt in the sequence format (as a string, control tokens in the prompt left as they are), with
        `<image>` placeholders for its images."""
        messages = self.prompt_messages(prompt, [None] * num_images, generation_mode, think)
        return self.apply_chat_template(messages, add_generation_prompt=generation_mode == "text")

    # ------------------------------------------------------------------------------------------------ calls

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        generation_mode: str = "text",
        think: bool = False,
        **kwargs: Unpack[UniMedVLProcessorKwargs],
    ) -> BatchFeature:
        """Returns `input_ids`, `attention_mask` `[batch, seq]`, and for images `pixel_values` `[num_patches, 3*14*14]` /
        `image_grid_hw` `[num_images, 2]` (ViT) and, in image mode, `vae_pixel_values` (a list of `[3, H, W]` tensors).

        `images`: one image, a flat list (in prompt order) or one list per prompt; PIL images, arrays, tensors, local
        paths, URLs or base64 strings. `text`: one prompt or a list (a batch).
        """
        if generation_mode not in GENERATION_MODES:
            raise ValueError(f"Unsupported generation_mode {generation_mode!r}: UniMedVL generates 'text' or 'image'.")
        prompts = [text or ""] if text is None or isinstance(text, str) else list(text)
        if not prompts:
            raise ValueError("No prompt given.")
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise TypeError(f"`text` must be a string or a list of strings, got {type(text).__name__}.")
        images_per_prompt = _split_images(images, prompts)
        # Text rendered by apply_chat_template(..., sanitize_control_tokens=True) is formatted, its user text marked.
        sanitized = bool(kwargs.get("sanitize_control_tokens"))
        formatted = [sanitized or FORMATTED_PROMPT.fullmatch(prompt) is not None for prompt in prompts]
        if not any(formatted):
            return self._call_with_plain_prompts(prompts, images_per_prompt, generation_mode, think, kwargs)
        if not all(formatted):
            raise ValueError(
                "Pass either plain prompts or prompts formatted with apply_chat_template in one batch, not both."
            )
        flat_images = [image for row in images_per_prompt for image in row]
        mode = kwargs.pop("mode", None) or ("generation" if generation_mode == "image" else "understanding")
        inputs = super().__call__(images=flat_images or None, text=prompts, mode=mode, **kwargs)
        self._check_image_blocks(inputs, images_per_prompt, generation_mode)
        return inputs

    def _call_with_plain_prompts(self, prompts, images_per_prompt, generation_mode, think, kwargs) -> BatchFeature:
        """Plain prompts through the chat template with their control tokens encoded as text."""
        conversations = [
            self.prompt_messages(prompt, images, generation_mode, think)
            for prompt, images in zip(prompts, images_per_prompt)
        ]
        processor_kwargs = dict(kwargs, generation_mode=generation_mode)
        return self.apply_chat_template(
            conversations,
            add_generation_prompt=generation_mode == "text",
            tokenize=True,
            return_dict=True,
            return_tensors=processor_kwargs.pop("return_tensors", "pt"),
            sanitize_control_tokens=True,
            processor_kwargs=processor_kwargs,
        )

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """[`ProcessorMixin.apply_chat_template`] that refuses an empty chat with a clear message."""
        if not conversation or (isinstance(conversation[0], (list, tuple)) and not all(conversation)):
            raise ValueError("Empty chat: give at least one message with text or an image.")
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, mode: str = "understanding", **kwargs) -> str:
        """The text of image `image_idx`'s blocks: its VAE block (generation mode) and its ViT block."""
        tokens = self.special_tokens
        height, width = image_inputs["image_grid_hw"][image_idx].tolist()
        blocks = tokens["vision_start"] + tokens["image"] * (height * width) + tokens["vision_end"]
        if mode == "generation":
            vae_height, vae_width = image_inputs["vae_pixel_values"][image_idx].shape[-2:]
            latents = (vae_height // self.latent_downsample) * (vae_width // self.latent_downsample)
            blocks = tokens["vision_start"] + tokens["latent"] * latents + tokens["vision_end"] + blocks
        return blocks

    def _check_image_blocks(self, inputs: BatchFeature, images_per_prompt: list[list], generation_mode: str) -> None:
        """Truncation must not cut an image block: every row keeps all the placeholders of its images."""
        if "image_grid_hw" not in inputs:
            return
        ids = self.special_ids
        grids = inputs["image_grid_hw"].tolist()
        vae = inputs.get("vae_pixel_values", [])
        input_ids = inputs["input_ids"]
        input_ids = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
        start = 0
        for row, images in zip(input_ids, images_per_prompt):
            count = len(images)
            expected = sum(h * w for h, w in grids[start : start + count])
            found = list(row).count(ids["image"])
            if generation_mode == "image":
                expected += sum(
                    (v.shape[-2] // self.latent_downsample) * (v.shape[-1] // self.latent_downsample)
                    for v in vae[start : start + count]
                )
                found += list(row).count(ids["latent"])
            if found != expected:
                raise ValueError(
                    f"A prompt keeps {found} of the {expected} image tokens of its {count} image(s): truncation cut "
                    "an image block. Raise `max_length` or disable `truncation`."
                )
            start += count

    # ------------------------------------------------------------------------------------------------ outputs

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


__all__ = [
    "CheckpointError",
    "UniMedVLProcessor",
    "UniMedVLProcessorKwargs",
    "CHAT_TEMPLATE",
    "VLM_THINK_SYSTEM_PROMPT",
    "GEN_THINK_SYSTEM_PROMPT",
]
