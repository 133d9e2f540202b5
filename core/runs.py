"""What earlier runs left in the workspace: their adapters, and how fast they trained."""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import adapter_name, read_yaml
from .errors import ConfigError, ModelLoadError
from .fileio import atomic_path
from .rundir import list_runs

IMPORTED_DIR = "adapters"  # adapter files the user imported into the workspace


@dataclass
class AdapterEntry:
    label: str  # what the user sees, e.g. "rex (LoRA, 800 steps)"
    path: str
    type: str
    base_model: str


def _entry(path: Path, origin: str) -> AdapterEntry | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys()) if "adapters" not in meta else []
        if keys:  # a community file (kohya / LyCORIS / diffusers): its kind from the tensor names, without reading them
            kind = next(k for s, k in (("hada_", "loha"), ("lokr_", "lokr"), ("dora_scale", "dora"),
                                       ("lora_magnitude", "dora"), ("lora_", "lora")) if any(s in k for k in keys))
            meta = {"steps": meta.get("ss_max_train_steps", "?"), "base_model": meta.get("ss_sd_model_name", "?")}
        else:
            specs = json.loads(meta["adapters"])
            kind = (specs.get("unet") or next(iter(specs.values())))["type"]
    except Exception:  # noqa: BLE001 - not an adapter, or damaged: not offered
        return None
    made = f"merged from {meta['merged_from']}" if meta.get("merged_from") else f"{meta.get('steps', '?')} steps"
    label = f"{origin}{path.stem} ({adapter_name(kind)}, {made}, base {meta.get('base_model') or '?'})"
    return AdapterEntry(label, str(path), kind, meta.get("base_model", ""))


def list_adapters(workspace: str | Path) -> list[AdapterEntry]:
    """The final adapter of every run and the imported files, newest first."""
    workspace = Path(workspace)
    found = [(run.adapter, "run: ") for run in list_runs(workspace / "runs") if run.adapter.is_file()]
    found += [(p, "imported: ") for p in (workspace / IMPORTED_DIR).glob("*.safetensors")]
    found.sort(key=lambda item: item[0].stat().st_mtime, reverse=True)
    return [e for e in (_entry(p, origin) for p, origin in found) if e is not None]


def import_adapter(workspace: str | Path, file: str | Path) -> Path:
    """Copy an adapter file (checked first) into `workspace/adapters/`; the original is only read."""
    from .adapters import read_adapter

    src = Path(file)
    read_adapter(src)  # ModelLoadError in plain words when it is not an adapter we can load
    dest = Path(workspace) / IMPORTED_DIR / src.name
    if dest.exists():
        raise ModelLoadError(f"An imported adapter called {src.name} already exists; rename the file first.")
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest


def measured_seconds_per_step(runs_dir: str | Path, base: str, resolution: int, batch_size: int) -> float | None:
    """Seconds per step of the newest earlier run with the same base model, resolution and batch size."""
    runs = sorted((run for run in list_runs(runs_dir) if run.losses.is_file()),
                  key=lambda run: run.losses.stat().st_mtime, reverse=True)
    for run in runs[:50]:
        loss_csv = run.losses
        try:
            cfg = read_yaml(run.config)
            same = (cfg["model"]["base"] == base and cfg["data"]["resolution"] == resolution
                    and cfg["train"]["batch_size"] == batch_size)
            if not same:
                continue
            rows = [(int(r["step"]), float(r["seconds"]))
                    for r in csv.DictReader(loss_csv.read_text(encoding="utf-8").splitlines())]
            # `seconds` restarts from 0 when a run is resumed: use the rows since the last restart.
            start = max([i for i in range(1, len(rows)) if rows[i][1] < rows[i - 1][1]], default=0)
            steps = rows[-1][0] - rows[start][0] + 1 if rows else 0
            if steps >= 2:
                return rows[-1][1] / steps
        except (OSError, KeyError, TypeError, ValueError, ConfigError):
            continue
    return None
