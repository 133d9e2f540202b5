"""The layout of a run folder, known here only (the trainer writes it, the app lists and resumes it).

    <runs>/<name>/config.yaml                 the resolved config the run started with
                  loss.csv                    one row per optimizer step
                  samples/step_NNNNNN_I.png   sample images (step 0: the base model before training)
                  checkpoints/step_NNNNNN/    adapter.safetensors, state.pt (optimizer, schedule, RNG), state.json
                  <name>.safetensors          the final adapter
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import Config, read_yaml
from .errors import ConfigError
from .fileio import write_text

CHECKPOINT_PREFIX = "step_"


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder; `state.json` is written last, so a folder without it is not a checkpoint."""

    path: Path

    @property
    def adapter(self) -> Path:
        return self.path / "adapter.safetensors"

    @property
    def state(self) -> Path:
        return self.path / "state.pt"

    @property
    def info(self) -> Path:
        return self.path / "state.json"

    @property
    def step(self) -> int:
        return int(self.path.name.removeprefix(CHECKPOINT_PREFIX))

    @property
    def complete(self) -> bool:
        return self.info.is_file()

    def read_step(self) -> int:
        """The step the checkpoint recorded (the name says the same; the file is what the trainer trusts)."""
        return json.loads(self.info.read_text())["step"]


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path).expanduser())

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def losses(self) -> Path:
        return self.path / "loss.csv"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        """The final adapter, named after the run so that copies of it stay recognisable."""
        return self.path / f"{self.name}.safetensors"

    def sample(self, step: int, index: int) -> Path:
        return self.samples / f"step_{step:06d}_{index}.png"

    def compare(self, index: int, on: bool) -> Path:
        return self.samples / f"compare_{index}_{'on' if on else 'off'}.png"

    def checkpoint(self, step: int) -> Checkpoint:
        return Checkpoint(self.checkpoints / f"{CHECKPOINT_PREFIX}{step:06d}")

    def all_checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint folder, complete or not, oldest first (the zero-padded names sort by step)."""
        found = sorted(self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*")) if self.checkpoints.is_dir() else []
        return [Checkpoint(p) for p in found if p.is_dir()]

    def latest_checkpoint(self) -> Checkpoint | None:
        done = [c for c in self.all_checkpoints() if c.complete]
        return done[-1] if done else None

    def is_run(self) -> bool:
        return self.config.is_file()

    def in_use(self) -> bool:
        """A folder that already holds something: a new run must not start in it."""
        return self.path.exists() and any(self.path.iterdir())

    def create(self, cfg: Config) -> None:
        self.samples.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        write_text(self.config, cfg.to_yaml())

    def read_config(self) -> Config:
        """The resolved config the run was started with, for resuming it."""
        if not self.config.is_file():
            raise ConfigError(f"{self.path} is not a run folder (it has no config.yaml).")
        return Config.from_dict(read_yaml(self.config))


def list_runs(runs_dir: str | Path) -> list[RunDir]:
    """The run folders in `runs_dir` (those with a config.yaml), by name."""
    return sorted((RunDir(p.parent) for p in Path(runs_dir).expanduser().glob("*/config.yaml")), key=lambda r: r.name)


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run was started with, for `--resume`."""
    return RunDir(run_dir).read_config()
