"""Full-size check (not part of the test suite: about 1 min and 10 GB RAM per family).

A random SD 1.5- / SD 2.x-shaped model, written as a single-file checkpoint WITHOUT our embedded
configs (like a file from the internet), must load offline through the configs shipped in
core/assets/model_configs. Run:  .venv/bin/python tools/check_full_size_checkpoints.py
"""
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from test_models import assert_same_weights, load_base_model, meta_model, save_foreign  # noqa: E402


def full_size_foreign_file_round_trip(family, tmp_path):
    """A random SD 1.5 / 2.x-shaped model written without configs loads through the real shipped configs."""
    model = meta_model(family)
    g = torch.Generator().manual_seed(0)
    for part in (model.unet, model.vae, model.text_encoder):
        part.to_empty(device="cpu")
        with torch.no_grad():
            for p in part.parameters():
                p.normal_(0, 0.02, generator=g) if p.ndim > 1 else p.uniform_(-0.1, 0.1, generator=g)
    model.text_encoder.embeddings.position_ids = torch.arange(77)[None]
    path = save_foreign(model, tmp_path / f"{family}.safetensors")
    loaded = load_base_model(str(path))
    assert loaded.family == ("sd1" if family == "sd15" else "sd2")
    assert loaded.prediction_type == ("epsilon" if family == "sd15" else "v_prediction")
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(model, part), getattr(loaded, part))
    ids = torch.tensor([[49406, 320, 1125, 49407]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_encoder(ids).last_hidden_state,
                                   model.text_encoder(ids).last_hidden_state, rtol=0, atol=1e-5)


if __name__ == "__main__":
    for fam in ("sd15", "sd2"):
        with tempfile.TemporaryDirectory() as d:
            full_size_foreign_file_round_trip(fam, Path(d))
        print(f"{fam}: ok")
