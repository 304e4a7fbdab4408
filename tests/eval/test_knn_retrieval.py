"""k-NN classification and image-text retrieval."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from tipstorch.data.sample import CorruptSampleError
from tipstorch.data.transforms import pil_to_tensor
from tipstorch.eval.knn import KNNConfig, knn_classification, knn_scores
from tipstorch.eval.retrieval import evaluate_retrieval, flatten_captions, retrieval_recall

TRAIN_FEATURES = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-2.0, 0.0]])
TRAIN_LABELS = torch.tensor([0, 1, 1, 0])


def test_knn_votes_are_exponentially_weighted_similarities():
    scores = knn_scores(TRAIN_FEATURES, TRAIN_LABELS, torch.tensor([[3.0, 0.0]]), 2, KNNConfig(k=2, temperature=0.5))
    # neighbours: cos 1 (class 0) and cos 0.8 (class 1)
    assert scores[0].tolist() == pytest.approx([math.exp(1 / 0.5), math.exp(0.8 / 0.5)])


def test_knn_k_larger_than_the_training_set_uses_every_sample():
    scores = knn_scores(TRAIN_FEATURES, TRAIN_LABELS, torch.tensor([[0.0, 1.0]]), 2, KNNConfig(k=20, temperature=1.0))
    # cosines to the test point: 0, 0.6, 1, 0
    assert scores[0].tolist() == pytest.approx([2 * math.exp(0.0), math.exp(0.6) + math.exp(1.0)])


def test_knn_classification_accuracy():
    test = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.2]])
    result = knn_classification(TRAIN_FEATURES, TRAIN_LABELS, test, torch.tensor([0, 1, 1]), 2, KNNConfig(k=1))
    assert result == pytest.approx({"top1": 2 / 3})


def test_knn_rejects_labels_outside_the_class_range():
    with pytest.raises(ValueError, match=r"train labels must be in \[0, 1\)"):
        knn_scores(TRAIN_FEATURES, TRAIN_LABELS, TRAIN_FEATURES, num_classes=1)


def test_flatten_captions_records_each_texts_image():
    texts, owners = flatten_captions([["a", "b"], ["c"], ["d", "e", "f"]])
    assert texts == ["a", "b", "c", "d", "e", "f"] and owners.tolist() == [0, 0, 1, 2, 2, 2]


# images e0 = x, e1 = y; texts t0 = x, t1 = (.6, .8) (image 0), t2 = y, t3 = (.8, .6) (image 1)
IMAGES = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
TEXTS = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 3.0], [0.8, 0.6]])
OWNERS = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_retrieval_recall_both_directions(chunk_size):
    result = retrieval_recall(IMAGES, TEXTS, OWNERS, ks=(1, 2), chunk_size=chunk_size)
    # image->text: both images rank an own caption first; text->image: t1 and t3 rank their image 2nd
    assert result == pytest.approx(
        {"image_to_text_r1": 1.0, "image_to_text_r2": 1.0, "text_to_image_r1": 0.5, "text_to_image_r2": 1.0}
    )


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourCaptions(Dataset):
    """One flat-coloured image per colour with two captions naming it; the green image is corrupt."""

    names = list(COLOURS)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        name = self.names[index]
        if name == "green":
            raise CorruptSampleError("green.jpg", "bad header")
        return Image.new("RGB", (28, 28), COLOURS[name]), [f"a {name} square", name]


def _colour_tokenizer(texts):
    return torch.tensor([[next(i for i, n in enumerate(COLOURS) if n in t)] for t in texts])


def test_evaluate_retrieval_end_to_end_skips_corrupt_images_with_their_captions():
    result = evaluate_retrieval(
        ColourCaptions(),
        pil_to_tensor,
        encode_image=lambda images: images.mean(dim=(2, 3)),
        encode_text=lambda ids: torch.nn.functional.one_hot(ids[:, 0], 3).float(),
        tokenizer=_colour_tokenizer,
        ks=(1,),
        batch_size=1,
    )
    assert result["image_to_text_r1"] == 1.0 and result["text_to_image_r1"] == 1.0
    assert (result["num_images"], result["num_texts"], result["num_skipped"]) == (2, 4, 1)


def test_pil_to_tensor_scales_to_unit_range():
    tensor = pil_to_tensor(Image.fromarray(np.full((2, 3, 3), 255, dtype=np.uint8)))
    assert tensor.shape == (3, 2, 3) and torch.all(tensor == 1.0)
