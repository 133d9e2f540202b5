"""The embedded demo model, measured with the automatic check of tools/eval_demo_model.py.

Still open (issue 3): the demo model draws the asked colour and background reliably but not yet
the asked shape (about 36% shape accuracy, target 90%), and the DreamBooth fidelity / class
preservation measurements (tools/measure_dreambooth.py) wait for a base model that draws shapes.
"""
from __future__ import annotations

import itertools

from PIL import Image

from core import demo
from core.models import load_base_model
from tools.eval_demo_model import evaluate


def test_demo_model_draws_the_asked_colour():
    """36 prompts of the training distribution, seeds never used in training."""
    combos = list(itertools.product(demo.COLOURS, demo.SHAPES, ["white", "gray"]))[::2]
    report, results = evaluate(load_base_model("demo"), combos=combos, first_seed=555_000)
    assert report["images"] == 36 and len(results) == 36
    assert report["colour_accuracy"] >= 0.9, report


def test_demo_subject_is_new_to_the_demo_model():
    """The subject's two-colour pattern is absent from what the base model draws for `a photo of a star`."""
    from core.sampling import generate, make_pipeline

    pipe = make_pipeline(load_base_model("demo"))
    images = generate(pipe, [demo.SUBJECT_CLASS_PROMPT] * 6, list(range(6)), steps=20, guidance=5.0, size=demo.SIZE)
    assert max(demo.subject_score(im) for im in images) < 0.2
    subject = [demo.subject_score(Image.open(p)) for p in sorted(demo.SUBJECT_DIR.glob("*.png"))]
    assert len(subject) == 5 and min(subject) > 0.6
