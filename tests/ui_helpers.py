"""Shared by the UI tests: start the app in-process on a free port, and call its handlers by name."""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import draw_subject
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output" / "ui"  # screenshots and other artefacts worth looking at


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningApp:
    app: object
    url: str
    workspace: Path

    @property
    def ctx(self):
        return self.app.ctx

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def call(self, client, api: str, **kwargs) -> dict:
        """Call the handler registered as `api`; return its outputs by name (Buttons and States are not sent)."""
        import gradio as gr

        result = client.predict(api_name=f"/{api}", **kwargs)
        names = [n for n, comp in self.app.api_outputs[api] if not isinstance(comp, (gr.Button, gr.State))]
        result = result if isinstance(result, tuple) else (result,)
        assert len(names) == len(result), (api, names, result)
        return dict(zip(names, result))


def start_app(workspace: Path) -> RunningApp:
    from ui.main import build_app, launch_kwargs

    app = build_app(workspace=workspace)
    port = free_port()
    app.queue(default_concurrency_limit=1)
    app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **launch_kwargs(app))
    return RunningApp(app, f"http://127.0.0.1:{port}/", workspace)


def stop_app(running: RunningApp) -> None:
    s = running.ctx.session
    if s.busy:
        s.stop()
        s.wait(60)
    running.ctx.class_job.stop()
    running.ctx.class_job.wait(60)
    running.app.close()


def sample_images(folder: Path) -> Path:
    """Three good pictures, a caption, and files the app must reject (not an image, corrupt, too small)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        draw_subject(folder / f"photo{i}.png", i)
    (folder / "photo1.txt").write_text("a photo of sks ball on a table\n")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    Image.new("RGB", (24, 24), (9, 9, 9)).save(folder / "tiny.png")
    return folder


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def launched_app(tmp_path_factory):
    """Module fixture body: the app on a fresh workspace, closed after the module's tests."""
    app = start_app(tmp_path_factory.mktemp("workspace"))
    yield app
    stop_app(app)
