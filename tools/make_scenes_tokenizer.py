"""Train the small SentencePiece model shipped for the built-in scenes captions.

The real TIPS tokenizer (32k SentencePiece) is a download; this one covers the scenes vocabulary so
that training and evaluation on scenes run offline. Settings follow the official tokenizer's use:
text lower-cased before encoding, no BOS/EOS, pad id 0, unk id 1. BPE with 512 pieces keeps every
scenes word whole (a unigram model cannot grow past ~180 pieces on this ~220-word vocabulary).

    python tools/make_scenes_tokenizer.py --samples 8000 --vocab-size 512 \
        --out src/tipstorch/assets/scenes_tokenizer.model
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import sentencepiece as spm

from tipstorch.data.scene_captions import ALT_DISTRACTORS, RELATIONS, SHAPE_SYNONYMS
from tipstorch.data.scenes import FLOOR_COLOURS, OBJECT_COLOURS, ScenesConfig, ScenesDataset


def caption_corpus(samples: int, seed: int) -> list[str]:
    """Lower-cased captions of ``samples`` scenes (all four sources) plus every vocabulary word."""
    dataset = ScenesDataset(ScenesConfig(image_size=32, seed=seed))
    lines = [text.lower() for i in range(samples) for text in dataset.sample(i).captions.values()]
    words = [*ALT_DISTRACTORS, *RELATIONS, *(w for ws in SHAPE_SYNONYMS.values() for w in ws)]
    words += (
        [c.name for c in OBJECT_COLOURS] + [c.shade for c in OBJECT_COLOURS] + [n for n, _ in FLOOR_COLOURS]
    )
    return lines + words


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument(
        "--seed", type=int, default=12345, help="scenes seed of the corpus (not a training seed)"
    )
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("src/tipstorch/assets/scenes_tokenizer.model"))
    args = parser.parse_args()

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus(args.samples, args.seed)),
        model_writer=model,
        vocab_size=args.vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    print(f"wrote {args.out} ({len(model.getvalue())} bytes, vocab {processor.get_piece_size()})")


if __name__ == "__main__":
    main()
