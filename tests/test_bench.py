"""The benchmark runs end to end: on the tiny model here, on an SD 1.5-shaped model on a GPU."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_prints_a_json_line_per_case_and_a_table(tmp_path):
    out = tmp_path / "bench.jsonl"
    cases = "ours-default,ours-lowvram,ours-dora,ours-loha,reference-lora,reference-loha,class-images,preview"
    r = subprocess.run([sys.executable, "-m", "bench.train_step", "--model", "tiny", "--steps", "3", "--warmup", "1",
                        "--only", cases, "--class-images", "2", "--class-batch", "2", "--class-steps", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["case"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == cases.split(",")
    for case in ("ours-default", "ours-lowvram", "ours-dora", "ours-loha", "reference-lora", "reference-loha"):
        row = rows[case]
        assert row["steps_timed"] == 3 and row["median_step_s"] > 0 and row["device"].startswith("CPU")
        assert abs(row["images_per_s"] - 2 / row["median_step_s"]) < 0.01 * row["images_per_s"]
        assert row["peak_allocated_gib"] == 0.0  # no GPU: no allocator statistics
    assert rows["ours-default"]["planner_gib"] > rows["ours-lowvram"]["planner_gib"] > 0
    assert rows["ours-dora"]["planner_gib"] > rows["ours-default"]["planner_gib"]  # DoRA keeps more for backward
    assert rows["class-images"]["one_at_a_time_images_per_s"] > 0 and rows["class-images"]["batched_speedup"] > 0
    assert rows["preview"]["previews"] == 3 and rows["preview"]["preview_s"] > 0  # step 0, 2 and 4
    table = r.stdout.split("\n", len(rows))[-1]
    assert "ours-default" in table and "speed-up vs reference" in table and "class images:" in table and "preview" in table


@pytest.mark.slow  # about 25 s on a 2-core CPU
def test_sdxl_benchmark_runs_a_preset_case_and_the_sdxl_reference(tmp_path):
    out = tmp_path / "bench.jsonl"
    r = subprocess.run([sys.executable, "-m", "bench.train_step", "--model", "tiny-sdxl", "--steps", "1", "--warmup", "1",
                        "--only", "ours-8gb,reference-lora", "--out", str(out)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["case"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == ["ours-8gb", "reference-lora"]
    assert all(row["steps_timed"] == 1 and row["median_step_s"] > 0 and row["model"] == "tiny-sdxl" for row in rows.values())
    assert rows["ours-8gb"]["planner_gib"] > 0 and rows["ours-8gb"]["resolution"] == 64
    assert "ours-8gb" in r.stdout.split("\n", len(rows))[-1]


@pytest.mark.slow  # about 30 s on a 2-core CPU
def test_flux_benchmark_runs_the_presets_and_the_flux_reference(tmp_path):
    """The FLUX cases on the tiny FLUX model: a quantized preset (NF4, bitsandbytes' CPU code), the bf16 settings
    and the diffusers FLUX loop; the table compares the bf16 case with the reference."""
    out = tmp_path / "bench.jsonl"
    cases = ["ours-flux-16gb", "ours-flux-bf16", "reference-lora"]
    r = subprocess.run([sys.executable, "-m", "bench.train_step", "--model", "tiny-flux", "--steps", "2", "--warmup", "1",
                        "--only", ",".join(cases), "--out", str(out)], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["case"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == cases
    assert all(row["steps_timed"] == 2 and row["median_step_s"] > 0 and row["model"] == "tiny-flux" for row in rows.values())
    assert all(row["planner_gib"] > 0 for case, row in rows.items() if case.startswith("ours-"))
    table = r.stdout.split("\n", len(rows))[-1]
    assert re.search(r"ours-flux-bf16 .* \d+\.\d\dx", table), table  # its speed-up against the reference loop


def test_benchmark_refuses_unknown_cases():
    r = subprocess.run([sys.executable, "-m", "bench.train_step", "--model", "tiny", "--only", "ours-fast"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "unknown case(s) ours-fast" in r.stderr
