"""Entry point: the GUI by default, and CLI sub-commands.

    python app.py [--port 7860] [--listen|--host H|--share --auth user:pw] [--workspace DIR]   start the GUI
    python app.py train --config FILE.yaml [--preset NAME] [--set key=value ...] [--resume RUN_DIR]
    python app.py class-images --config FILE.yaml [--set key=value ...]
    python app.py sample --base MODEL [--adapter FILE[@WEIGHT] ...] --prompt TEXT [--width W --height H] --out FILE.png
"""
from __future__ import annotations

import argparse
import os
import queue
import signal
import sys
import warnings

WORKSPACE = "workspace"
# Flags of the browser app alone; a command given with one is refused rather than silently ignoring it.
GUI_ONLY = {"port": "--port", "host": "--host", "listen": "--listen", "share": "--share", "auth": "--auth"}
# Which commands use the flags that may come before or after the command's name.
SHARED = {"workspace": ("--workspace", {None, "train", "class-images"}),
          "allow_pickle": ("--allow-pickle", {None, "train", "class-images", "sample", "merge"})}


def _quiet() -> None:
    """Hide library chatter that means nothing to a user (progress bars of weight loading, dtype notes)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def config_from_args(args):
    """The run's settings: preset <- --config file <- this command's flags (--workspace, --allow-pickle) <- --set."""
    from pathlib import Path

    from core.config import load_config

    flags: dict = {"output": {"dir": str(Path(args.workspace) / "runs")}} if args.workspace != WORKSPACE else {}
    if args.allow_pickle:
        flags["model"] = {"allow_pickle": True}
    return load_config(args.config, overrides=args.set or [], preset=args.preset, workspace=args.workspace,
                       settings=flags)


def cmd_train(args) -> int:
    from tqdm import tqdm

    from core import events as ev
    from core.rundir import load_run_config
    from core.trainer import train

    cfg = load_run_config(args.resume) if args.resume else config_from_args(args)
    commands: queue.Queue = queue.Queue()
    bar = tqdm(total=cfg.train.max_steps, unit="step", dynamic_ncols=True, disable=not is_main_process())

    def on_event(e) -> None:
        if isinstance(e, ev.Progress):
            bar.n = e.step
            postfix = {"loss": f"{e.loss:.4f}", "lr": f"{e.lr:.2e}"}
            bar.set_postfix(postfix, refresh=False)
            bar.refresh()
        elif isinstance(e, ev.Log):
            bar.write(e.message)
        elif isinstance(e, ev.SampleReady):
            bar.write(f"samples at step {e.step}: {', '.join(e.paths)}")
        elif isinstance(e, ev.CheckpointSaved):
            bar.write(f"checkpoint: {e.path}")
        elif isinstance(e, ev.CompareReady):
            bar.write("adapter off / on, same seeds: " + ", ".join(e.paths))

    def on_interrupt(signum, frame):
        # First Ctrl+C: stop cleanly after this step, saving a checkpoint. Second: abort.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        bar.write("Stopping after this step (a checkpoint is saved). Press Ctrl+C again to abort.")
        commands.put(ev.STOP)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        run_dir = train(cfg, emit=on_event, commands=commands, resume_dir=args.resume)
    finally:  # main() may be called in-process (tests, scripts): leave Ctrl+C as it was
        signal.signal(signal.SIGINT, previous)
        bar.close()
    if is_main_process():
        print(run_dir)
    return 0


def cmd_class_images(args) -> int:
    from tqdm import tqdm

    from core import events as ev
    from core.class_images import class_dir_for, ensure_class_images
    from core.models import load_base_from_config, place
    from core.precision import default_device, frozen_dtype, resolve_precision

    cfg = config_from_args(args)
    device = default_device()
    dtype = frozen_dtype(resolve_precision(cfg))  # before the slow load: fp16 without a GPU fails at once
    base = place(load_base_from_config(cfg), device, dtype)
    bar = tqdm(unit="image")

    def on_event(e):
        if isinstance(e, ev.ClassImagesProgress):
            bar.total = e.total
            bar.n = e.done
            bar.refresh()
        elif isinstance(e, ev.ClassImagesStep):  # a batch takes a while: show its denoising steps
            bar.total = e.total
            bar.set_postfix_str(f"next {e.batch}: step {e.step}/{e.steps}")
        elif isinstance(e, ev.Log):
            bar.write(e.message)

    items = ensure_class_images(cfg, base, device, emit=on_event)
    bar.close()
    print(f"{len(items)} class images in {class_dir_for(cfg)}")
    return 0


def parse_adapter_arg(text: str) -> tuple[str, float]:
    """`file.safetensors@0.8` -> (file, 0.8); no @ means weight 1."""
    path, sep, weight = text.rpartition("@")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def cmd_sample(args) -> int:
    from core import adapters
    from core.models import load_base_model
    from core.playground import check_sides
    from core.precision import default_device
    from core.sampling import generate, make_pipeline, save_png

    width, height = args.width or args.size, args.height or args.size
    check_sides(width=width, height=height)  # before the slow load
    device = default_device()
    base = load_base_model(args.base, allow_pickle=args.allow_pickle).to(device)
    weights = {}
    for i, spec in enumerate(args.adapter or []):
        path, weight = parse_adapter_arg(spec)
        adapters.load_into(base.parts, adapters.read_adapter(path), f"a{i}")
        weights[f"a{i}"] = weight
    if weights:
        adapters.set_weights(base.parts, weights)
    pipe = make_pipeline(base, device)
    (image,) = generate(pipe, [args.prompt], [args.seed], steps=args.steps, guidance=args.guidance,
                        width=width or None, height=height or None, negative_prompt=args.negative or "")
    info = {"prompt": args.prompt, "seed": args.seed, "steps": args.steps, "base": args.base,
            "adapters": ", ".join(args.adapter or [])}
    out = save_png(image, args.out, info)
    print(out)
    return 0


def cmd_export(args) -> int:
    from core.adapters import read_adapter
    from core.formats import export_adapter, where_to_use

    print(export_adapter(args.adapter, args.out, args.format))
    if args.format == "kohya":
        print(where_to_use(read_adapter(args.adapter).type).replace("`", ""), file=sys.stderr)
    elif args.format == "lycoris" and read_adapter(args.adapter).type == "dora":
        print("This DoRA file is for LyCORIS' own loader; for ComfyUI and Forge export with --format kohya.",
              file=sys.stderr)
    return 0


def cmd_merge(args) -> int:
    from core.errors import UserError
    from core.merge import merge_loras, merge_to_model

    files = [parse_adapter_arg(a) for a in args.adapter]
    if args.into == "lora":
        print(merge_loras(files, args.out, base_spec=args.base, rank=args.rank, allow_pickle=args.allow_pickle))
        return 0
    if not args.base:
        raise UserError("Give the base model to merge into: --base demo, a hub id, a folder or a .safetensors file.")
    if args.rank is not None:
        raise UserError("--rank only applies with --into lora (a merged model has no rank).")
    print(merge_to_model(args.base, files, args.out, allow_pickle=args.allow_pickle))
    return 0


def cmd_gui(args) -> int:
    """The browser app (ui/), on 127.0.0.1 unless --listen / --host / --share, which need --auth."""
    from ui.main import launch

    return launch(args)


def misplaced_flags(parser: argparse.ArgumentParser, args) -> list[str]:
    """The flags given that the chosen command does not use."""
    if args.command is None:
        return []
    given = [flag for dest, flag in GUI_ONLY.items() if getattr(args, dest) != parser.get_default(dest)]
    return given + [flag for dest, (flag, commands) in SHARED.items()
                    if args.command not in commands and getattr(args, dest) != parser.get_default(dest)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description="Teach Stable Diffusion a new subject with small adapters (DreamBooth + LoRA/LoHa/LoKr). Without a command: start the browser app.")
    gui = p.add_argument_group("browser app (no command)")
    gui.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    gui.add_argument("--host", help="address to bind (default 127.0.0.1: this computer only); another needs --auth")
    gui.add_argument("--listen", action="store_true", help="serve on the local network (0.0.0.0); needs --auth")
    gui.add_argument("--share", action="store_true", help="also open a public gradio.live link; needs --auth")
    gui.add_argument("--auth", metavar="USER:PASSWORD", help="require this login (needed with --listen, --host, --share)")
    gui.add_argument("--allow-pickle", action="store_true",
                     help="let the app load pickled .ckpt base models (only files you trust; read with weights_only)")
    gui.add_argument("--workspace", default=WORKSPACE, help="folder for datasets, class images, runs (default ./workspace)")
    sub = p.add_subparsers(dest="command")

    def config_args(sp):
        sp.add_argument("--config", help="YAML config file (sparse: only the settings you change)")
        sp.add_argument("--preset", help="preset name: built in (presets/, e.g. sd15-lora) or saved from the app "
                                         "(WORKSPACE/presets/); a `preset:` key in the file wins")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting, e.g. train.max_steps=400 (repeatable)")
        sp.add_argument("--allow-pickle", action="store_true", default=argparse.SUPPRESS,
                        help="allow loading a pickled .ckpt base model")
        sp.add_argument("--workspace", default=argparse.SUPPRESS,
                        help="the app's folder: runs go to WORKSPACE/runs, class images to WORKSPACE/class_images, "
                             "and its presets are found (default ./workspace)")

    t = sub.add_parser("train", help="train an adapter")
    config_args(t)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its latest checkpoint")
    c = sub.add_parser("class-images", help="generate the class images for prior preservation only")
    config_args(c)
    s = sub.add_parser("sample", help="generate an image with a base model and adapters")
    s.add_argument("--base", required=True, help="demo, a hub id, a diffusers folder or a .safetensors checkpoint")
    s.add_argument("--adapter", action="append", metavar="FILE[@WEIGHT]", help="adapter file, optionally @weight (repeatable)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative", default="")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=7.5)
    s.add_argument("--width", type=int, default=0, help="image width in pixels, a multiple of 8 (default: --size)")
    s.add_argument("--height", type=int, default=0, help="image height in pixels, a multiple of 8 (default: --size)")
    s.add_argument("--size", type=int, default=0, help="a square image's side in pixels (default: the model's own)")
    s.add_argument("--allow-pickle", action="store_true", default=argparse.SUPPRESS,
                   help="allow loading a pickled .ckpt base model")
    s.add_argument("--out", required=True, help="output .png")
    e = sub.add_parser("export", help="write an adapter for A1111 / Forge / ComfyUI (kohya / LyCORIS layout)")
    e.add_argument("--adapter", required=True, help="an adapter file this app wrote (a run's .safetensors)")
    e.add_argument("--format", default="kohya", choices=["kohya", "diffusers", "lycoris"],
                   help="kohya: A1111, Forge, ComfyUI, LyCORIS (LoRA, DoRA, LoHa, LoKr; a DoRA exact in ComfyUI / "
                        "Forge); lycoris: the same with a DoRA exact in LyCORIS' own loader; diffusers: "
                        "pipe.load_lora_weights (LoRA, DoRA)")
    e.add_argument("--out", required=True, help="output .safetensors")
    m = sub.add_parser("merge", help="fuse adapters into the base model (a new model), or several LoRAs into one LoRA")
    m.add_argument("--into", choices=["model", "lora"], default="model",
                   help="model (default): base + adapters saved as a new model; lora: LoRAs combined into one LoRA file")
    m.add_argument("--base", help="demo, a hub id, a diffusers folder or a .safetensors checkpoint (with --into lora: "
                                  "only needed for kohya / A1111 files)")
    m.add_argument("--adapter", action="append", required=True, metavar="FILE[@WEIGHT]",
                   help="adapter file (ours or a kohya / LyCORIS / diffusers one), optionally @weight (repeatable)")
    m.add_argument("--rank", type=int, help="with --into lora: shrink to this rank (closest approximation; "
                                             "default: exact, the sum of the ranks)")
    m.add_argument("--allow-pickle", action="store_true", default=argparse.SUPPRESS,
                   help="allow loading a pickled .ckpt base model")
    m.add_argument("--out", required=True, help="model: a .safetensors single file (A1111, ComfyUI) or a new diffusers "
                                                "folder; lora: a .safetensors adapter file")
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet()
    parser = build_parser()
    args = parser.parse_args(argv)
    from core.errors import UserError

    misplaced = misplaced_flags(parser, args)
    if getattr(args, "resume", None):  # a resumed run keeps the settings and folder it was started with
        misplaced += [flag for flag, given in (("--config", args.config), ("--preset", args.preset), ("--set", args.set),
                                               ("--workspace", args.workspace != WORKSPACE)) if given]
    if misplaced:
        what = f"`{args.command} --resume` (a resumed run keeps its own settings and folder)" if getattr(
            args, "resume", None) else f"`{args.command}` (the browser app's flags go without a command)"
        print(f"Error: {', '.join(misplaced)} does not apply to {what}; leave it out.", file=sys.stderr)
        return 2

    handlers = {"train": cmd_train, "class-images": cmd_class_images, "sample": cmd_sample, "export": cmd_export, "merge": cmd_merge,
                None: cmd_gui}
    if args.command in ("train", "class-images") and not args.config and not args.preset and not getattr(args, "resume", None):
        print("Error: give a config file (--config FILE.yaml) or a preset (--preset NAME).", file=sys.stderr)
        return 2
    try:
        return handlers[args.command](args)
    except UserError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Aborted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
