"""Any transformers image-to-text model as a ``Captioner``: PaliGemma (its "caption en" prompt) by
default, or any model ``AutoModelForImageTextToText`` loads, by hub id or local directory."""

from __future__ import annotations

import torch
from PIL import Image

from tipstorch.engine.precision import inference_bf16

DEFAULT_CAPTIONER = (
    "google/paligemma-3b-ft-cococap-224"  # the paper's captioner: PaliGemma fine-tuned on COCO captions
)


class TransformersCaptioner:
    """Greedy (or beam) generation of ``max_new_tokens`` at most, weights in bfloat16 where the
    device supports it (``precision``), one caption per image.

    A prompt is given to the processor as is, behind the model's image token when it has one
    (PaliGemma: "<image>caption en"); the caption is the generated text after the prompt.
    """

    def __init__(
        self,
        name_or_path: str,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        max_new_tokens: int = 64,
        num_beams: int = 1,
        local_files_only: bool = False,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if inference_bf16(self.device, precision) else torch.float32
        self.processor = AutoProcessor.from_pretrained(name_or_path, local_files_only=local_files_only)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
        self.model = (
            AutoModelForImageTextToText.from_pretrained(
                name_or_path, dtype=self.dtype, local_files_only=local_files_only
            )
            .to(self.device)
            .eval()
        )
        self.generation = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": False}

    def _text(self, prompt: str) -> str:
        image_token = getattr(self.processor, "image_token", None)
        return prompt if image_token is None or image_token in prompt else image_token + prompt

    def __call__(self, images: list[Image.Image], prompt: str) -> list[str]:
        inputs = self.processor(
            images=images, text=[self._text(prompt)] * len(images), return_tensors="pt", padding="longest"
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k != "labels"}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            generated = self.model.generate(**inputs, **self.generation)
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None and generated.shape[1] >= prompt_ids.shape[1]:
            if torch.equal(generated[:, : prompt_ids.shape[1]], prompt_ids):
                generated = generated[:, prompt_ids.shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(generated, skip_special_tokens=True)]
