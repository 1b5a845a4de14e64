"""The trained toy SD3 model shipped in models/: it loads, exports, and draws the colour it is asked for."""

from __future__ import annotations

import numpy as np
import pytest

import slimengine as se
from slimengine.export.checkpoint import load_checkpoint
from slimengine.tools import toy_shapes
from slimengine.tools.toy_demo import class_grid, generate_classes
from slimengine.tools.train_toy_sd3 import CONFIG
from slimengine.tools.train_toy_sd3 import main as train_main

from .conftest import TOY_CHECKPOINT as TOY


def test_the_procedural_images_carry_their_class_colour():
    rng = np.random.default_rng(0)
    images, _, colours = toy_shapes.batch(24, rng)
    rendered = toy_shapes.to_images(toy_shapes.to_latents(images).numpy())
    assert [toy_shapes.dominant_colour(img) for img in rendered] == list(colours)


def test_shipped_checkpoint_is_a_1x_student_of_the_trainer_config():
    ck = load_checkpoint(TOY)
    assert ck.config == CONFIG and ck.has_compensation
    assert ck.metadata["toy_shapes"] and ck.metadata["sampling"]["cache_blocks"] == "1-3"


@pytest.mark.parametrize("plan,guidance,min_correct", [("28-step CFG", None, 17), ("1x", None, 15), ("1x", 3.0, 16)])
def test_generated_pictures_have_the_prompted_colour(toy_bundles, plan, guidance, min_correct):
    session = se.open_engine(toy_bundles[plan]).session()
    latents, stats = generate_classes(session, seed=0, guidance=guidance)
    _, colours = class_grid()
    found = [toy_shapes.dominant_colour(img) for img in toy_shapes.to_images(latents)]
    correct = sum(f == c for f, c in zip(found, colours))
    print(f"{plan} (guidance {guidance or 'default'}): {correct}/18 pictures in the prompted colour, NFE {stats['effective_nfe']:.2f}")
    assert correct >= min_correct


def test_trainer_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "toy.safetensors"
    assert train_main(["-o", str(out), "--steps", "3", "--batch-size", "8", "--compensation-steps", "3", "-q"]) == 0
    ck = load_checkpoint(out)
    assert ck.config == CONFIG and ck.metadata["training"]["steps"] == 3
