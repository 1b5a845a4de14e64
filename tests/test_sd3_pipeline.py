"""slimengine.SD3Pipeline against diffusers' StableDiffusion3Pipeline on the same tiny random pipeline folder
(tests/pipeline_files.py): the same call, with the one line that builds the pipeline changed, gives the same image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimengine import SD3Pipeline, SD3PipelineOutput
from tests.conftest import PIPELINE_T5_LENGTH
from tests.pipeline_files import NEGATIVES, PROMPTS


@pytest.fixture(scope="module")
def pipe(sd3_pipeline_bundle):
    with SD3Pipeline.from_pretrained(sd3_pipeline_bundle) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def reference(sd3_pipeline):
    from diffusers import StableDiffusion3Pipeline

    reference = StableDiffusion3Pipeline.from_pretrained(sd3_pipeline, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    return reference


def _same_image(got, want):
    """Within the prompt path's conformance bounds (docs/pipeline.md, Conformance)."""
    got, want = (np.stack([np.asarray(i) for i in images]) for images in (got, want))
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
    assert diff.mean() <= 0.5 and diff.max() <= 2, (diff.mean(), diff.max())


def test_same_call_same_images_as_diffusers(pipe, reference):
    """Two prompts, two images each, negative prompts, CFG, a torch.Generator: diffusers' arguments as they are."""
    call = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=5.0, height=64, width=80,
                num_images_per_prompt=2)
    with torch.no_grad():
        want = reference(**call, generator=torch.Generator().manual_seed(3), max_sequence_length=PIPELINE_T5_LENGTH).images
    got = pipe(**call, generator=torch.Generator().manual_seed(3))
    assert isinstance(got, SD3PipelineOutput) and len(got.images) == 4
    assert all(image.mode == "RGB" and image.size == (80, 64) for image in got.images)
    _same_image(got.images, want)
    # A list of generators, one per image, as diffusers draws them.
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    with torch.no_grad():
        want = reference(PROMPTS[0], num_inference_steps=3, guidance_scale=1.0, height=64, width=64, num_images_per_prompt=2,
                         generator=generators, max_sequence_length=PIPELINE_T5_LENGTH).images
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    _same_image(pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=1.0, height=64, width=64, num_images_per_prompt=2,
                     generator=generators).images, want)


def test_output_types_and_seeds(pipe):
    """"np" is the 8-bit image in [0, 1]; "latent" the sampled latents; an int is the runtime's seed (Session.generate's);
    return_dict=False gives a tuple."""
    call = dict(num_inference_steps=2, height=64, width=64)
    pil = pipe("a red circle", generator=7, **call).images
    array = pipe("a red circle", generator=7, output_type="np", **call).images
    latents = pipe("a red circle", generator=7, output_type="latent", **call).images
    assert array.dtype == np.float32 and array.shape == (1, 64, 64, 3)
    assert np.array_equal(np.round(array[0] * 255).astype(np.uint8), np.asarray(pil[0]))
    want = pipe.session.generate(prompt=["a red circle"], seed=7, num_steps=2, height=64, width=64)
    assert np.array_equal(np.asarray(pil[0]), want.image[0]) and np.array_equal(latents, want.latents)
    (images,) = pipe("a red circle", generator=7, return_dict=False, **call)
    assert np.array_equal(np.asarray(images[0]), np.asarray(pil[0]))
    # The same torch latents given as latents= and drawn from the generator: the same image.
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(1))
    by_latents = pipe("a blue square", latents=noise, **call).images[0]
    by_generator = pipe("a blue square", generator=torch.Generator().manual_seed(1), **call).images[0]
    assert np.array_equal(np.asarray(by_latents), np.asarray(by_generator))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(prompt=None), TypeError, "prompt must be a str"),
    (dict(prompt=["a", 3]), TypeError, "prompt must be a str"),
    (dict(negative_prompt=["x", "y"]), ValueError, "2 texts for 1 prompts"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
    (dict(output_type="pt"), ValueError, "output_type"),
    (dict(max_sequence_length=77), ValueError, f"T5 length is {PIPELINE_T5_LENGTH}"),
    (dict(generator="seed"), TypeError, "generator must be"),
    (dict(generator=[torch.Generator()]), ValueError, "1 generators for 2 images"),
])
def test_bad_arguments_are_named(pipe, kwargs, error, match):
    call = dict(prompt="a cat", num_inference_steps=1)
    call.update(kwargs)
    if "generator" in kwargs and isinstance(kwargs["generator"], list):
        call["num_images_per_prompt"] = 2
    with pytest.raises(error, match=match):
        pipe(**call)


def test_a_bundle_without_pipeline_is_refused(distilled_bundle):
    with pytest.raises(ValueError, match="exported with its pipeline"):
        SD3Pipeline.from_pretrained(distilled_bundle)
