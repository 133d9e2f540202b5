"""DreamBooth works, measured on the embedded demo model.

The demo model draws the asked colour and shape (tools/eval_demo_model.py's automatic check); short
LoRA, LoHa and LoKr runs with prior preservation teach it the two-colour demo star (subject fidelity
rises well above the base model's), while the class prompt and an unrelated prompt stay close to
what the base model drew; without prior preservation the class prompt drifts further. Metrics and
thresholds: tools/measure_dreambooth.py (numbers measured with it are in the README).
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from PIL import Image

from core import demo
from core.models import load_base_model
from tools.eval_demo_model import evaluate
from tools.measure_dreambooth import measure, numbers, train_demo_adapter

OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
STEPS = 400  # per adapter, as in the demo presets; about 55 s each on a 2-core CPU
SEEDS = range(8)
# Measured here (one thread, as in this suite; numbers written to test-output/dreambooth.json): subject score
# 0.003 for the base model, 0.02-0.16 with an adapter (LoHa/LoKr lowest; the VAE reproduces the instance
# images themselves at about 0.38); plain stars for the class prompt: 100% base, 37-88% with prior
# preservation, 0% without; "a blue circle" images kept: 7 or 8 of 8. Runs differ with thread count, so the
# thresholds keep a margin of about 2x (issue 16 raises these targets).
FIDELITY_GAIN = 0.01  # adapter's subject score minus the base model's
CLASS_KEPT_WITH_PRIOR = 0.25  # share of class-prompt images still a plain one-colour star
CLASS_KEPT_WITHOUT_PRIOR = 0.125
UNRELATED_KEPT = 0.85  # share of "a blue circle ..." images still a blue circle: at most one of 8 changed


def test_demo_model_draws_the_asked_colour_and_shape():
    """36 prompts of the training distribution, seeds never used in training."""
    combos = list(itertools.product(demo.COLOURS, demo.SHAPES, ["white", "gray"]))[::2]
    report, results = evaluate(load_base_model("demo"), combos=combos, first_seed=555_000)
    assert report["images"] == 36 and len(results) == 36
    assert report["colour_accuracy"] >= 0.9, report
    assert report["shape_accuracy"] >= 0.9, report


def test_demo_subject_is_new_to_the_demo_model():
    """The subject's two-colour pattern is absent from what the base model draws for `a photo of a star`."""
    from core.sampling import generate, make_pipeline

    pipe = make_pipeline(load_base_model("demo"))
    images = generate(pipe, [demo.SUBJECT_CLASS_PROMPT] * 6, list(range(6)), steps=20, guidance=5.0, size=demo.SIZE)
    assert max(demo.subject_score(im) for im in images) < 0.2
    subject = [demo.subject_score(Image.open(p)) for p in sorted(demo.SUBJECT_DIR.glob("*.png"))]
    assert len(subject) == 5 and min(subject) > 0.6


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    work = tmp_path_factory.mktemp("dreambooth")
    paths = {}
    for kind, prior in (("lora", True), ("loha", True), ("lokr", True), ("lora", False)):
        path = train_demo_adapter(kind, prior, work / "runs", work / "class_images", steps=STEPS)
        assert path.is_file()
        paths[path.stem] = path
    result = measure(paths, SEEDS)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    (OUTPUT / "dreambooth.json").write_text(json.dumps(numbers(result), indent=1))
    return result


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_adapter_learns_the_subject(measured, kind):
    base, m = measured["base"]["fidelity"], measured[f"{kind}-prior"]["fidelity"]
    assert m - base >= FIDELITY_GAIN, (kind, base, m)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_prior_preservation_keeps_the_class_and_other_prompts(measured, kind):
    m = measured[f"{kind}-prior"]
    assert measured["base"]["class_kept"] >= 0.9 and measured["base"]["unrelated_kept"] >= 0.9
    assert m["class_kept"] >= CLASS_KEPT_WITH_PRIOR, (kind, m["class_kept"])
    assert m["unrelated_kept"] >= UNRELATED_KEPT, (kind, m["unrelated_kept"])


@pytest.mark.slow
def test_without_prior_preservation_the_class_drifts_further(measured):
    """Language drift: trained without class images, "a photo of a star" turns into the subject."""
    with_prior, without = measured["lora-prior"], measured["lora-noprior"]
    assert without["class_kept"] <= CLASS_KEPT_WITHOUT_PRIOR < CLASS_KEPT_WITH_PRIOR <= with_prior["class_kept"]
    assert without["class_fidelity"] >= 1.5 * with_prior["class_fidelity"]  # the subject leaks into "a star"
    assert without["unrelated_kept"] >= UNRELATED_KEPT  # unrelated prompts are unaffected at this length either way
