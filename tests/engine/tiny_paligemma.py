"""A tiny random PaliGemma (SigLIP 1 layer + Gemma 1 layer, width 16) with a word-level tokenizer,
built and saved locally: a stand-in captioner directory that needs no download."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "a an the red green blue square circle dog car on left right of above below with image".split()
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def save_tiny_paligemma(directory: str | Path, seed: int = 0) -> Path:
    """Save processor + model to ``directory``; generation yields words of WORDS (special and
    location tokens get zero output embeddings, so random word logits win)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        PreTrainedTokenizerFast,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    image_processor = SiglipImageProcessor(size={"height": 28, "width": 28})
    image_processor.image_seq_length = 4  # (28 / 14) ** 2 patches
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=16,
    )
    text = GemmaConfig(
        vocab_size=len(processor.tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        projection_dim=16,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[: len(SPECIALS)] = 0.0
        embeddings[len(SPECIALS) + len(WORDS) :] = 0.0
    out = Path(directory)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
