"""DreamBooth works, measured on the embedded demo model and the demo subject (a two-colour star).

- The demo model draws the asked colour and shape (the automatic check of tools/eval_demo_model.py).
- For LoRA, LoHa and LoKr trained with prior preservation: images for the instance prompt show the
  subject's pattern far more than the base model's (subject fidelity), while images for the class
  prompt and an unrelated prompt stay close to the base model's; trained without prior
  preservation, the class prompt drifts further. Metrics: tools/measure_dreambooth.py.
"""
from __future__ import annotations

import pytest
from conftest import ADAPTER_TYPES

from core.class_images import ensure_class_images
from core.config import load_config
from core.models import load_base_model
from core.trainer import train
from tools.eval_demo_model import evaluate
from tools.measure_dreambooth import measure

STEPS = 200  # shorter than the demo presets (300) to keep the suite fast
CLASS_IMAGES = 24
SEEDS = range(8)
FIDELITY_MARGIN = 0.3  # subject score (0..1): adapter minus base, for the instance prompt
MAX_CLASS_DRIFT = 25.0  # mean absolute pixel difference (0..255) with vs without adapter, prior preservation on


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_class_images")
    cfg = load_config(preset="demo-lora", overrides=[f"data.class_dir={folder}", f"data.num_class_images={CLASS_IMAGES}"])
    assert len(ensure_class_images(cfg, load_base_model("demo"))) == CLASS_IMAGES
    return folder


def train_demo(kind: str, prior: bool, out, class_dir) -> str:
    cfg = load_config(preset=f"demo-{kind}", overrides=[
        f"output.dir={out}", f"output.name={kind}-{'prior' if prior else 'noprior'}", f"train.max_steps={STEPS}",
        "train.sample_every=0", "train.checkpoint_every=0", f"train.prior_preservation={str(prior).lower()}",
        f"data.class_dir={class_dir}", f"data.num_class_images={CLASS_IMAGES}",
    ])
    run_dir = train(cfg)
    return str(run_dir / f"{run_dir.name}.safetensors")


@pytest.fixture(scope="module")
def measured(tmp_path_factory, class_dir):
    out = tmp_path_factory.mktemp("demo_runs")
    cache = {}

    def get(kind: str, prior: bool) -> dict:
        if (kind, prior) not in cache:
            cache[kind, prior] = measure(train_demo(kind, prior, out, class_dir), SEEDS)
        return cache[kind, prior]

    return get


def test_demo_model_draws_the_asked_colour_and_shape():
    """36 prompts of the training distribution, seeds never used in training."""
    import itertools

    from core import demo

    combos = list(itertools.product(demo.COLOURS, demo.SHAPES, ["white", "gray"]))[::2]
    report, _ = evaluate(load_base_model("demo"), combos=combos, first_seed=555_000)
    assert report["images"] == 36
    assert report["colour_accuracy"] >= 0.85, report
    assert report["shape_accuracy"] >= 0.8, report


@pytest.mark.parametrize("kind", ADAPTER_TYPES)
def test_subject_fidelity(measured, kind):
    m = measured(kind, True)
    assert m["fidelity_base"] < 0.2, "the base model should not know the subject's pattern"
    assert m["fidelity_adapter"] > m["fidelity_base"] + FIDELITY_MARGIN, m


@pytest.mark.parametrize("kind", ADAPTER_TYPES)
def test_class_preservation(measured, kind):
    with_prior, without = measured(kind, True), measured(kind, False)
    assert with_prior["class_drift"] < MAX_CLASS_DRIFT and with_prior["unrelated_drift"] < MAX_CLASS_DRIFT, with_prior
    assert without["class_drift"] > with_prior["class_drift"], (with_prior["class_drift"], without["class_drift"])
