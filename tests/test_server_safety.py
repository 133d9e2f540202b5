"""What the server guarantees, against the app really launched by `app.main` with the command line's flags.

- It listens on 127.0.0.1 unless told otherwise; listening elsewhere needs a login, and the login is enforced.
- It serves the workspace's files (and Gradio's upload cache and its own static assets), nothing else: not
  /etc/passwd, not another temporary folder, not the app's own code, not through `..` (raw or percent-encoded),
  not through a link inside the workspace that points outside.
- Uploads land in Gradio's upload cache and the workspace only, whatever their names.
- Handlers that take paths or names from the browser (adapter slots, export, merge, import, dataset folders and
  selections, class-image rejection, run names, presets) never read a non-adapter file and never write, move or
  delete anything outside the workspace: each answers with a plain error or does nothing.

Related tests elsewhere: test_ui_engine.py::test_public_serving_needs_a_password and
::test_serving_defaults_to_this_computer (the flags' checks), test_fuzz_dataset.py (hostile files and names in the
dataset code itself), test_ui_handlers.py::test_playground_mixes_run_adapters (merge name "../up").
"""
from __future__ import annotations

import hashlib
import http.client
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, draw_subject
from ui_helpers import RunningApp, free_port, wait_until

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError, AuthenticationError  # noqa: E402

TOKEN = uuid.uuid4().hex[:10]  # in every name a hostile call tries to create outside: easy to look for anywhere
SECRET = f"secret-{TOKEN}"
PASSWORD = "a-long-password"
TINY = dict(base_choice="tiny", resolution=32)


@dataclass
class Served:
    running: RunningApp
    launch: Launch
    port: int
    root: Path  # holds workspace/, uploads/ (Gradio's upload cache), client/ (downloads) and outside/
    outside: Path
    uploads: Path
    client: Client

    @property
    def ws(self) -> Path:
        return self.running.workspace

    @property
    def ctx(self):
        return self.running.ctx

    def call(self, api: str, **kwargs) -> dict:
        return self.running.call(self.client, api, **kwargs)

    def outside_state(self) -> dict[str, tuple]:
        """Every entry under root except the workspace, the upload cache and the client's downloads."""
        return tree_state(self.root, skip={self.ws, self.uploads, self.root / "client"})


def tree_state(root: Path, skip: set[Path]) -> dict[str, tuple]:
    state = {}
    for folder, dirs, files in os.walk(root):  # links are listed, never followed
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in dirs + files:
            path = here / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = ("link", os.readlink(path))
            elif path.is_file():
                state[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                state[rel] = ("dir",)
    return state


def escapes(*starts: Path) -> list[Path]:
    """Anything named with TOKEN in a folder above the workspace (or beside the app): where `../` names would land."""
    found = []
    folders = {ROOT, ROOT.parent, Path.cwd(), Path("/tmp")}
    for start in starts:
        folders.update(start.parents)
    for folder in folders:
        found += folder.glob(f"*{TOKEN}*")
    return found


def make_outside(outside: Path) -> None:
    """The files a hostile browser goes for: a secret, photos, a genuine adapter, all outside the workspace."""
    from core import adapters
    from core.adapter_file import AdapterSpec
    from core.models import build_tiny_model

    (outside / "photos").mkdir(parents=True)
    (outside / "secret.txt").write_text(SECRET)
    for i in range(2):
        draw_subject(outside / "photos" / f"photo{i}.png", i)
    draw_subject(outside / "private.png", 3)
    draw_subject(outside / "other.png", 4)  # never added to a dataset
    model = build_tiny_model()
    specs = {"unet": AdapterSpec("lora", 2, 2, ["to_q", "to_v"])}
    adapters.inject_all(model.parts, specs)
    adapters.save_adapter(outside / "real.safetensors", model.parts, specs, {"base_model": "tiny"})


class Launch:
    """`app.main(argv)` in a thread (as `./launch.sh` runs it), stopped by closing the app as Ctrl+C would."""

    def __init__(self, monkeypatch, argv: list[str]):
        import app as entry
        from ui import main

        self.built: list = []
        real = main.build_app

        def capture(*args, **kwargs):
            self.built.append(real(*args, **kwargs))
            return self.built[-1]

        monkeypatch.setattr(main, "build_app", capture)
        self.port = free_port()
        self.result: dict = {}
        self.thread = threading.Thread(target=lambda: self.result.update(rc=entry.main(["--port", str(self.port),
                                                                                       *argv])), daemon=True)
        self.thread.start()
        wait_until(lambda: "rc" in self.result or (self.built and getattr(self.built[0], "server", None) is not None
                                                   and self.built[0].server.started), 120, "the app to start")
        assert "rc" not in self.result, self.result
        self.app = self.built[0]

    def bound_addresses(self) -> set[str]:
        """The addresses the listening sockets are really bound to (not the setting: the sockets themselves)."""
        (server,) = self.app.server.servers
        return {s.getsockname()[0] for s in server.sockets}

    def stop(self) -> int:
        ctx = self.app.ctx
        ctx.class_job.stop()
        ctx.class_job.wait(60)
        self.app.close()
        self.thread.join(60)
        return self.result.get("rc")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    make_outside(root / "outside")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(root / "uploads"))  # the upload cache, where it can be watched
        launch = Launch(mp, ["--workspace", str(root / "workspace")])
        url = f"http://127.0.0.1:{launch.port}/"
        running = RunningApp(launch.app, url, launch.app.ctx.workspace)
        client = Client(url, verbose=False, download_files=str(root / "client"))
        yield Served(running, launch, launch.port, root, root / "outside", root / "uploads", client)
        assert launch.stop() == 0  # a clean stop, as after Ctrl+C


@pytest.fixture(scope="module")
def dataset(served) -> str:
    served.call("create_dataset", new_name="safe", resolution=32)
    out = served.call("add_folder", dataset="safe", folder=str(served.outside / "photos"), resolution=32)
    assert out["add_msg"].startswith("Added 2 images.")  # a folder the user picked is read (copied), never changed
    return "safe"


def raw_get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    """A request with the path exactly as given (no client-side clean-up of `..` or %-escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def raw_call(served: Served, api: str, **values) -> str:
    """Call a handler with hand-made input payloads (gradio_client would upload any file path it is given first)."""
    info = httpx.get(f"{served.running.url}gradio_api/info").json()["named_endpoints"][f"/{api}"]
    data = [values.get(p["parameter_name"], p.get("parameter_default")) for p in info["parameters"]]
    r = httpx.post(f"{served.running.url}gradio_api/call/{api}", json={"data": data})
    r.raise_for_status()
    return httpx.get(f"{served.running.url}gradio_api/call/{api}/{r.json()['event_id']}", timeout=60).text


# --------------------------------------------------------------------------- where it listens

def test_it_listens_on_this_computer_only_by_default(served):
    assert served.running.app.server_name == "127.0.0.1"
    assert served.launch.bound_addresses() == {"127.0.0.1"}
    assert served.running.app.local_url.startswith("http://127.0.0.1:")


def test_listening_on_the_network_really_asks_for_the_login(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    launch = Launch(monkeypatch, ["--listen", "--auth", f"me:{PASSWORD}", "--workspace", str(tmp_path / "ws")])
    try:
        assert launch.bound_addresses() == {"0.0.0.0"}
        (tmp_path / "ws" / "playground").mkdir()
        picture = draw_subject(tmp_path / "ws" / "playground" / "made.png", 0)
        url = f"http://127.0.0.1:{launch.port}/"
        for path in ("config", "gradio_api/info", f"gradio_api/file={picture}"):
            r = httpx.get(url + path)
            assert r.status_code in (401, 403) and r.content != picture.read_bytes(), path
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(url, verbose=False, download_files=False)
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, auth=("me", "wrong-password"), verbose=False, download_files=False)
        client = Client(url, auth=("me", PASSWORD), verbose=False, download_files=False)
        out = RunningApp(launch.app, url, tmp_path / "ws").call(client, "playground_adapters")
        assert out["adapter_1"]["choices"][0] == ["(none)", ""]
        with httpx.Client() as session:  # the browser's way: log in, then the file is served
            session.post(url + "login", data={"username": "me", "password": PASSWORD}).raise_for_status()
            assert session.get(f"{url}gradio_api/file={picture}").content == picture.read_bytes()
    finally:
        assert launch.stop() == 0


@pytest.mark.parametrize("argv", [["--host", "192.168.1.20"], ["--host", "::"], ["--share", "--auth", "me:"],
                                  ["--listen", "--auth", ":pw"]])
def test_refused_serving_flags_start_nothing(argv, monkeypatch, capsys):
    # test_ui_engine.py::test_public_serving_needs_a_password covers --listen, --share, --host 0.0.0.0 and "nopass".
    import app as entry
    from ui import main

    built = []
    monkeypatch.setattr(main, "build_app", lambda *a, **k: built.append(1))
    assert entry.main(argv) == 2
    assert built == []  # refused before anything was built or bound
    err = capsys.readouterr().err
    assert "--auth" in err and "user:password" in err


# --------------------------------------------------------------------------- what it serves

def test_the_workspace_files_are_served(served, dataset):
    pg = dict(pg_base_choice="tiny", pg_prompt="a photo of sks ball", pg_steps=2, pg_seed=1, pg_width=32, pg_height=32)
    made = Path(served.call("playground_generate", **pg)["pg_info"].split("saved as `")[1].rstrip("`"))
    assert made.parent == served.ws / "playground" and made.is_file()
    sample = served.ws / "runs" / "r1" / "samples" / "step_000000_0.png"
    sample.parent.mkdir(parents=True)
    draw_subject(sample, 1)
    photo = served.ws / "datasets" / dataset / "photo0.png"
    for path in (made, sample, photo):
        for route in (f"/gradio_api/file={path}", f"/gradio_api/file/{path}"):  # the second: Gradio's older route
            assert raw_get(served.port, route) == (200, path.read_bytes()), route
        assert raw_get(served.port, f"/gradio_api/file={path}", "HEAD")[0] == 200


def refused_paths(served: Served) -> list[str]:
    ws, out = served.ws, served.outside
    rel = os.path.relpath(out, ws)  # ../outside
    return [
        "/etc/passwd", f"{out}/secret.txt", str(ROOT / "app.py"), str(ROOT / "core" / "config.py"), "app.py",
        "core/config.py", "../../../../../../../../etc/passwd",
        f"{ws}/{rel}/secret.txt", f"{ws}/%2e%2e/{out.name}/secret.txt", f"{ws}/..%2f{out.name}%2fsecret.txt",
        f"{ws}%2f%2e%2e%2f{out.name}%2fsecret.txt", f"{ws}/datasets/../../{out.name}/secret.txt",
        f"{ws}/%252e%252e/{out.name}/secret.txt", f"{ws}/link-to-secret.txt", f"{ws}/link-to-outside/secret.txt",
        f"{ws}/playground/..\\..\\{out.name}\\secret.txt", f"file://{out}/secret.txt",
        f"{served.root}/client/../outside/secret.txt",
    ]


def out_url(served: Served) -> str:
    return f"http://127.0.0.1:{served.port}/gradio_api/file={served.outside}/secret.txt"


def test_nothing_outside_the_workspace_is_served(served):
    (served.ws / "link-to-secret.txt").symlink_to(served.outside / "secret.txt")
    (served.ws / "link-to-outside").symlink_to(served.outside, target_is_directory=True)
    assert (served.ws / "link-to-outside" / "secret.txt").read_text() == SECRET  # the links do lead there
    secrets = [SECRET.encode(), b"root:", b"def main(", b"class Config", b"CONFIG_VERSION"]
    tried = 0
    for target in refused_paths(served):
        for route in (f"/gradio_api/file={target}", f"/gradio_api/file/{target}"):
            for method in ("GET", "HEAD"):
                status, body = raw_get(served.port, route, method)
                assert status in (403, 404, 405), (route, status)  # 405: the older route has no HEAD
                assert not any(s in body for s in secrets), route
                tried += 1
    # Gradio's own asset routes, with the same tricks: nothing above their folders.
    up = "../" * 12
    enc = "%2e%2e/" * 12
    for route in (f"/static/{up}etc/passwd", f"/static/{enc}etc/passwd", f"/assets/{up}etc/passwd",
                  f"/assets/{enc}etc/passwd", f"/svelte/{up}etc/passwd", f"/svelte/{enc}etc/passwd",
                  f"/static/{enc}{str(ROOT / 'app.py').lstrip('/')}", f"/assets/{'%2e%2e%2f' * 12}etc%2fpasswd",
                  "/gradio_api/custom_component/x/client/..%2f..%2f..%2f/passwd", "/gradio_api/proxy=file:///etc/passwd",
                  f"/gradio_api/proxy={out_url(served)}", f"/gradio_api/run-history/records/{enc}etc/assets/passwd",
                  "/app.py", "/core/config.py", f"/{ROOT.name}/app.py", f"/file={served.outside}/secret.txt"):
        status, body = raw_get(served.port, route)
        assert status in (400, 401, 403, 404, 405, 422), (route, status)
        assert not any(s in body for s in secrets), route
        tried += 1
    assert tried > 80


# --------------------------------------------------------------------------- uploads

def test_uploads_land_only_in_the_upload_cache_and_the_workspace(served, dataset):
    before = served.outside_state()
    out = served.call("add_upload", dataset=dataset, upload=[handle_file(str(served.outside / "private.png"))],
                      resolution=32)
    assert out["add_msg"] == "Added 1 image."
    assert (served.ws / "datasets" / dataset / "private.png").read_bytes() == (served.outside / "private.png").read_bytes()
    assert list(served.uploads.rglob("private.png"))  # the upload itself is in Gradio's cache

    out = served.call("import_adapter", import_file=handle_file(str(served.outside / "real.safetensors")))
    assert "Imported `real.safetensors`" in out["import_msg"] and (served.ws / "adapters" / "real.safetensors").is_file()

    # Hostile file names in a raw upload: each file stays in the upload cache (under a harmless name), or is refused.
    names = [f"../../escape-{TOKEN}.png", f"/tmp/escape-{TOKEN}.png", f"..\\..\\escape-{TOKEN}.png",
             f"../{served.outside.name}/secret.txt", f"%2e%2e%2fescape-{TOKEN}.png", "..", f"./../escape-{TOKEN}"]
    stored = 0
    for i, name in enumerate(names):
        r = httpx.post(f"{served.running.url}gradio_api/upload",
                       files=[("files", (name, f"upload {i}".encode(), "application/octet-stream"))])
        if r.status_code == 400:
            continue
        assert r.status_code == 200, r.text
        (path,) = map(Path, r.json())
        assert path.resolve().is_relative_to(served.uploads.resolve()), (name, path)
        assert path.read_bytes() == f"upload {i}".encode()
        stored += 1
    assert stored >= 5
    assert served.outside_state() == before and (served.outside / "secret.txt").read_text() == SECRET
    assert escapes(served.ws, served.uploads) == []


def test_a_file_that_was_not_uploaded_is_not_taken_as_an_upload(served, dataset):
    """A hand-made payload naming a file elsewhere on the server (not uploaded through the app) is refused."""
    before = served.outside_state()
    files = sorted(p.name for p in (served.ws / "datasets" / dataset).iterdir())
    for target in (served.outside / "photos" / "photo1.png", Path("/etc/passwd"), served.outside / "real.safetensors"):
        payload = {"path": str(target), "orig_name": target.name, "meta": {"_type": "gradio.FileData"}}
        text = raw_call(served, "add_upload", dataset=dataset, upload=[payload], resolution=32)
        assert "event: error" in text and "event: complete" not in text, text
        text = raw_call(served, "import_adapter", import_file=payload)
        assert "event: error" in text and "event: complete" not in text, text
    assert sorted(p.name for p in (served.ws / "datasets" / dataset).iterdir()) == files
    assert sorted(p.name for p in (served.ws / "adapters").glob("*")) in ([], ["real.safetensors"])
    assert served.outside_state() == before


# --------------------------------------------------------------------------- paths and names from the browser

CLASS = dict(TINY, class_prompt="a photo of a ball", num_class_images=1, class_steps=1)


def hostile_calls(served: Served, dataset: str, class_folder: Path) -> list[tuple[str, dict]]:
    out, ws = served.outside, served.ws
    up = os.path.relpath(out, ws / "datasets" / dataset)  # ../../../outside
    class_up = os.path.relpath(out, class_folder)
    adapter_paths = ["/etc/passwd", str(out / "secret.txt"), str(out / "real.safetensors"),
                     f"{ws}/adapters/../../{out.name}/real.safetensors", "../../etc/passwd", f"{ws}/link-to-secret.txt"]
    base = dict(pg_base_choice="tiny", pg_base_other="")
    pg = dict(base, pg_prompt="x", pg_steps=1, pg_width=32, pg_height=32)
    calls = []
    for path in adapter_paths:
        calls += [("adapter_info", dict(adapter_1=path)), ("export_adapter", dict(adapter_1=path)),
                  ("playground_generate", dict(pg, adapter_1=path)),
                  ("merge_adapters", dict(base, merge_into="lora", merge_name=f"m-{TOKEN}", merge_rank=0,
                                          adapter_1=path, weight_1=1.0))]
    for name in (f"../escape-{TOKEN}", f"../../escape-{TOKEN}", f"{out}/escape-{TOKEN}", f"..\\escape-{TOKEN}", ".."):
        for into in ("lora", "folder"):
            calls.append(("merge_adapters", dict(base, merge_into=into, merge_name=name, merge_rank=0,
                                                 adapter_1=str(ws / "adapters" / "real.safetensors"), weight_1=1.0)))
        calls += [("create_dataset", dict(new_name=name, resolution=32)),
                  ("save_preset", dict(TINY, preset_name=name)),
                  ("add_folder", dict(dataset=name, folder=str(out / "photos"), resolution=32)),
                  ("save_captions", dict(dataset=name, captions={"headers": ["file", "caption"],
                                                                 "data": [["photo0.png", "x"]]})),
                  ("load_preset", dict(preset=name)), ("continue_run", dict(resume_run=name)),
                  ("start_training", dict(TINY, dataset=dataset, run_name=name, instance_prompt="a photo of sks ball",
                                          prior_preservation=False, max_steps=1, sample_every=0))]
    selections = [f"{up}/other.png", f"{up}/secret.txt", str(out / "other.png"), "/etc/passwd", "../photo0.png/..",
                  f"nothere.png, {up}/secret.txt, ..", "..\\..\\other.png", f"{ws}/link-to-secret.txt"]
    for selected in selections:
        calls += [("remove_images", dict(dataset=dataset, selected=selected, resolution=32)),
                  ("class_reject", dict(CLASS, class_selected=selected.replace(up, class_up))),
                  ("save_captions", dict(dataset=dataset, captions={"headers": ["file", "caption"],
                                                                    "data": [[selected, "overwritten?"]]}))]
    return calls


def test_paths_and_names_from_the_browser_never_reach_outside_the_workspace(served, dataset):
    if not (served.ws / "adapters" / "real.safetensors").exists():  # a genuine adapter in the workspace to merge
        served.call("import_adapter", import_file=handle_file(str(served.outside / "real.safetensors")))
    (served.ws / "link-to-secret.txt").unlink(missing_ok=True)
    (served.ws / "link-to-secret.txt").symlink_to(served.outside / "secret.txt")
    from core.class_images import class_dir_for
    from ui.form import form_config

    class_folder = class_dir_for(form_config(CLASS, served.ws))  # where class_reject looks: made to exist here
    class_folder.mkdir(parents=True, exist_ok=True)
    draw_subject(class_folder / "class_00000.png", 0)
    folder = served.ws / "datasets" / dataset
    images_before = sorted(p.name for p in folder.glob("*.png"))
    for start in (folder, class_folder):  # the `../` selections below do lead to a real file outside, from both
        assert (start / os.path.relpath(served.outside / "other.png", start)).is_file()
    before = served.outside_state()
    served.call("playground_adapters")  # this tab's adapter lists: the workspace's adapters only
    calls = hostile_calls(served, dataset, class_folder)
    outcomes = [attempt(served, *call) for call in calls]  # one tab (its lists hold the dataset and the adapter)
    refused = 0
    for (api, kwargs), out in zip(calls, outcomes):
        if isinstance(out, AppError):
            assert "Something went wrong" not in str(out), (api, kwargs, out)  # a plain refusal, not a crash
            if api == "merge_adapters" and kwargs["adapter_1"] == str(served.ws / "adapters" / "real.safetensors"):
                assert "cannot be a merged file name" in str(out), out  # refused for its name, the adapter was fine
            if api == "start_training":
                assert "Run name (`output.name`) must be a plain folder name" in str(out), out
            if api == "save_captions" and kwargs["dataset"] == dataset:
                assert "is not an image of this dataset" in str(out), out  # the handler's own check
            assert not (api in ("remove_images", "class_reject") and kwargs.get("dataset", dataset) == dataset), out
            refused += 1
            continue
        # Not refused: a no-op (no selected name matched a file of the dataset or of the class images).
        assert api in ("remove_images", "class_reject"), (api, kwargs, out)
        if api == "remove_images":
            assert out["add_msg"].startswith("Removed 0 image(s)"), (kwargs, out)
    assert served.ctx.session.snapshot()["state"] == "idle" and not served.ctx.class_job.busy  # nothing started
    assert served.outside_state() == before
    assert (served.outside / "secret.txt").read_text() == SECRET
    assert escapes(served.ws, served.uploads) == []
    assert sorted(p.name for p in folder.glob("*.png")) == images_before
    assert [p.name for p in class_folder.iterdir()] == ["class_00000.png"]  # nothing rejected, nothing made
    assert list(served.ws.rglob(f"*{TOKEN}*")) == []  # no merge, preset, dataset or run of those names, even inside
    assert not (served.ws / "exports").exists() or not any((served.ws / "exports").iterdir())
    assert refused > 60


def attempt(served: Served, api: str, kwargs: dict):
    try:
        return served.call(api, **kwargs)
    except AppError as e:
        return e


def test_a_run_name_cannot_put_the_run_outside_the_workspace(served, dataset):
    # output.name "../x" would put the run folder outside the workspace: refused by name.
    runs = served.ws / "runs"
    before = sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []
    for name in (f"../../escape-{TOKEN}", f"../escape-{TOKEN}", f"{served.outside}/escape-{TOKEN}", ".."):
        with pytest.raises(AppError, match=r"Run name \(`output\.name`\) must be a plain folder name"):
            served.call("start_training", **TINY, dataset=dataset, run_name=name, instance_prompt="a photo of sks ball",
                        prior_preservation=False, max_steps=1, sample_every=0)
    assert served.ctx.session.snapshot()["state"] == "idle"
    assert (sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []) == before
    assert escapes(served.ws) == []
