"""Plain event objects the trainer emits, and the commands it obeys between steps.

The trainer never knows who listens: the session keeps a history for the UI, the CLI draws a
tqdm bar, tests collect them in a list.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union


@dataclass
class Log:
    message: str


@dataclass
class RunStarted:
    """The run folder exists (new or resumed): listeners learn where the run writes before its first step."""

    run_dir: str


@dataclass
class Progress:
    step: int  # optimizer steps done
    total: int
    loss: float
    instance_loss: float
    prior_loss: float | None
    lr: float
    it_per_s: float
    eta_s: float


@dataclass
class SampleReady:
    step: int
    paths: list[str]
    prompts: list[str]


@dataclass
class CompareReady:
    """The end of a run in pictures: each prompt with the adapter off, then on (same seed), in pairs."""

    step: int
    paths: list[str]
    captions: list[str]


@dataclass
class CheckpointSaved:
    step: int
    path: str


@dataclass
class Paused:
    step: int


@dataclass
class Resumed:
    step: int


@dataclass
class Finished:
    run_dir: str
    adapter_path: str
    step: int
    stopped: bool = False  # True when the user stopped before max_steps


@dataclass
class Failed:
    message: str
    traceback: str = ""


@dataclass
class ClassImagesProgress:
    done: int
    total: int
    paths: list[str] = field(default_factory=list)


@dataclass
class ClassImagesStep:
    """A denoising step of the batch being made: `done` of `total` images are saved, the next `batch` are at `step`
    of `steps`. A large batch takes minutes; this is what shows it moving."""

    done: int
    total: int
    batch: int
    step: int
    steps: int


Event = Union[Log, RunStarted, Progress, SampleReady, CheckpointSaved, Paused, Resumed, Finished, Failed,
              ClassImagesProgress, ClassImagesStep]
Emit = Callable[[Event], None]

# Commands, put on the trainer's command queue as plain strings.
STOP, PAUSE, RESUME, SAMPLE, SAVE = "stop", "pause", "resume", "sample", "save"
COMMANDS = (STOP, PAUSE, RESUME, SAMPLE, SAVE)


def ignore(event: Event) -> None:
    """The default listener: drop every event."""
