"""The [0, 1] input contract at every public entry point that takes image tensors (issue 29, field case
23, torchxrayvision #89): 0-255 floats and other scales are refused with a message naming the contract;
uint8 is converted (/ 255) and gives the embeddings of the same image in [0, 1]."""

import pytest
import torch

import g2d
from g2d.data.synthetic import SyntheticCXR
from g2d.errors import ImageInputError
from g2d.image_input import as_model_input
from g2d.inference.grounding import dense_similarity, similarity_maps
from g2d.inference.zeroshot import ZeroShotScorer, class_prompts, load_prompts


@pytest.fixture(scope="module")
def model_and_images(tiny_model_dir):
    model = g2d.load_model(str(tiny_model_dir)).eval()
    data = SyntheticCXR(num_samples=4, image_size=64, seed=5)
    return model, torch.stack([data[i]["image"] for i in range(4)])


def _u8(x):
    return (x * 255).round().to(torch.uint8)


def test_the_contract_by_hand():
    x = torch.rand(2, 1, 8, 8)
    assert as_model_input(x, "here") is x
    torch.testing.assert_close(as_model_input(_u8(x), "here"), _u8(x).float() / 255)
    eight_bit = r"here: images must be in \[0, 1\], got values in \[.*\] \(8-bit values\? divide by 255"
    for bad, message in ((x * 255, eight_bit),
                         ((x - 0.5) / 0.25, r"normalised with a mean and std"),
                         (x.to(torch.int16), r"floating point in \[0, 1\] \(or uint8"),
                         (x.bool(), r"floating point"),
                         (x[0], r"shape \(1, 8, 8\) \(add the batch dimension"),
                         (torch.rand(2, 2, 8, 8), r"\[B, 1 or 3, H, W\]"),
                         (x.masked_fill(x > 0.5, float("nan")), "NaN")):
        with pytest.raises(ImageInputError, match=message):
            as_model_input(bad, "here")
    assert as_model_input(x.half(), "here").dtype == torch.float16  # other float types in range pass


@pytest.mark.parametrize("entry", ["encode_image", "image_forward", "dense_embeddings", "zero-shot",
                                   "similarity_maps", "dense_similarity"])
def test_every_g2d_entry_point_refuses_0_255_floats_and_converts_uint8(model_and_images, entry):
    model, x = model_and_images
    scorer = ZeroShotScorer(model, class_prompts(["pleural effusion", "pneumothorax"], load_prompts()))
    prompts = ["pleural effusion"] * len(x)
    run = {"encode_image": lambda t: model.encode_image(t),
           "image_forward": lambda t: model.image_forward(t, decode=False).embedding,
           "dense_embeddings": lambda t: model.dense_embeddings(t),
           "zero-shot": lambda t: scorer(t),
           "similarity_maps": lambda t: similarity_maps(model, t, prompts),
           "dense_similarity": lambda t: dense_similarity(model, t, prompts)}[entry]
    with pytest.raises(ImageInputError, match=r"\[0, 1\]"):
        run(x * 255)
    with torch.no_grad():
        torch.testing.assert_close(run(_u8(x)), run(_u8(x).float() / 255))
