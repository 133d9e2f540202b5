"""Playground tab: a base model with several adapters mixed by weight; generate, compare, test a paused run."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from core.errors import ModelLoadError, UserError
from core.adapters import read_adapter
from core.datasets import check_name
from core.community import describe
from core.formats import export_adapter, where_to_use
from core.merge import merge_loras, merge_to_model
from core.playground import STRENGTHS, Wanted, from_file
from core.runs import IMPORTED_DIR, import_adapter, list_adapters

from .common import Ctx, Handler, TabParts, bind, bind_table, model_picker, pick
from .form import base_spec

SLOTS = 4
MERGE_TARGETS = {"lora": "One LoRA file (LoRAs only; appears in the adapter lists)",
                 "single": "A new model: one .safetensors file (A1111, Forge, ComfyUI, and here as Other)",
                 "folder": "A new model: a diffusers folder"}
LIVE = "live"
LIVE_LABEL = "Live: the paused training run"
LIVE_RUN = "live run"  # its label in captions


def adapter_choices(ctx: Ctx) -> list[tuple[str, str]]:
    """(none), the paused run's live adapter while a run is paused, then the saved adapters."""
    live = [(LIVE_LABEL, LIVE)] if ctx.session.snapshot()["state"] == "paused" else []
    return [("(none)", "")] + live + [(e.label, e.path) for e in list_adapters(ctx.workspace)]


def wanted_adapters(ctx: Ctx, spec: str, values: dict) -> list[tuple[str, Wanted]]:
    """(label, Wanted) for every filled slot, in slot order."""
    out, seen = [], set()
    for i in range(1, SLOTS + 1):
        choice, weight = values.get(f"adapter_{i}"), float(values.get(f"weight_{i}") or 0.0)
        if not choice:
            continue
        if choice == LIVE:
            w = live_wanted(ctx, spec, weight)
            label = LIVE_RUN
        else:
            w = from_file(choice, weight)
            label = choice.rsplit("/", 1)[-1].removesuffix(".safetensors")
        if w.key in seen:
            raise UserError(f"The same adapter ({label}) is chosen in two slots; use one slot and its weight.")
        seen.add(w.key)
        out.append((label, w))
    return out


def live_wanted(ctx: Ctx, spec: str, weight: float) -> Wanted:
    s = ctx.session
    snap = s.snapshot()
    if snap["state"] != "paused" or s.config is None:
        raise UserError("No training run is paused. Pause the run on the Train tab, then generate here "
                        "(\"pause and test\"); press Resume there when done.")
    if s.config.model.base != spec:
        raise ModelLoadError(f"The paused run trains on the base model {s.config.model.base!r}: choose that base "
                             "model here to test its live adapter.")
    return Wanted(f"live|{snap['run_dir']}|{snap['started_at']}|{snap['step']}", s.live_adapter, weight)


def settings_text(values: dict, labels: list[str], weights: list[float]) -> str:
    mix = ", ".join(f"{n} ×{w:g}" for n, w in zip(labels, weights)) or "none (the base model alone)"
    return (f"Seed {int(values['pg_seed'])} · {int(values['pg_steps'])} steps · "
            f"guidance {values['pg_guidance']:g} · adapters: {mix}")


def run_generation(ctx: Ctx, values: dict, strengths) -> tuple[list, str, list[str], list[float]]:
    spec = base_spec(values["pg_base_choice"], values["pg_base_other"])
    chosen = wanted_adapters(ctx, spec, values)
    if [label for label, _ in chosen] == [LIVE_RUN]:  # the paused run alone: drawn by the run's own model
        images = ctx.session.live_images(
            values["pg_prompt"], values.get("pg_negative") or "", int(values["pg_seed"]), int(values["pg_steps"]),
            float(values["pg_guidance"]), width=int(values.get("pg_width") or 0),
            height=int(values.get("pg_height") or 0), strengths=tuple(strengths), weight=chosen[0][1].weight)
        return images, spec, [LIVE_RUN], [chosen[0][1].weight]
    images = ctx.playground.generate(
        spec, [w for _, w in chosen], values["pg_prompt"], values.get("pg_negative") or "", int(values["pg_seed"]),
        int(values["pg_steps"]), float(values["pg_guidance"]), strengths=tuple(strengths),
        width=int(values.get("pg_width") or 0), height=int(values.get("pg_height") or 0),
        quantize=values.get("pg_quantize") or "none")
    return images, spec, [n for n, _ in chosen], [w.weight for _, w in chosen]


def build(ctx: Ctx, initial: dict) -> dict:
    c: dict = {}
    gr.Markdown("Try your adapters: mix several (LoRA, DoRA, LoHa and LoKr together), each with its own weight. "
                "Switching adapters does not reload the base model.", elem_classes="db-note")
    c["live_note"] = gr.Markdown(elem_id="pg-live-note")
    with gr.Row():
        with gr.Column(scale=2):
            c["pg_base_choice"], c["pg_base_other"] = model_picker("pg", value=initial["base_choice"],
                                                                   other=initial["base_other"])
            c["pg_quantize"] = gr.Dropdown(["none", "int8", "nf4"], value="none", label="Quantized weights",
                                           elem_id="pg-quantize",
                                           info="FLUX.1 on a 24 GB card: int8; 16 GB: nf4. LoRA adapters (DoRA: nf4) only.")
            choices = adapter_choices(ctx)
            for i in range(1, SLOTS + 1):
                with gr.Row(equal_height=True):
                    c[f"adapter_{i}"] = gr.Dropdown(choices, value="", label=f"Adapter {i}", scale=3,
                                                    elem_id=f"pg-adapter-{i}")
                    c[f"weight_{i}"] = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="Weight", scale=2,
                                                 elem_id=f"pg-weight-{i}")
            with gr.Row():
                c["refresh_btn"] = gr.Button("Refresh adapter list", size="sm", elem_id="pg-refresh")
                c["import_file"] = gr.UploadButton("Import an adapter file...", file_types=[".safetensors"],
                                                   size="sm", elem_id="pg-import")
            c["import_msg"] = gr.Markdown()
            c["adapter_info"] = gr.Markdown(elem_id="pg-adapter-info")
            c["export_btn"] = gr.Button("Export adapter 1 for A1111 / Forge / ComfyUI", size="sm",
                                        elem_id="pg-export")
            c["export_file"] = gr.File(label="Exported file (kohya / LyCORIS layout)", visible=False,
                                       elem_id="pg-export-file")
            with gr.Accordion("Merge the chosen adapters", open=False, elem_id="pg-merge-box"):
                gr.Markdown("Combine the adapters in the slots, at their weights, into one file.", elem_classes="db-note")
                c["merge_into"] = gr.Radio([(label, value) for value, label in MERGE_TARGETS.items()], value="lora",
                                           label="Merge into", elem_id="pg-merge-into")
                with gr.Row():
                    c["merge_name"] = gr.Textbox("", label="Name", placeholder="my-mix", elem_id="pg-merge-name")
                    c["merge_rank"] = gr.Number(0, label="Rank (LoRA)", precision=0, minimum=0, elem_id="pg-merge-rank",
                                                info="0: exact (the sum of the ranks); smaller: a smaller file, close.")
                c["merge_btn"] = gr.Button("Merge", size="sm", elem_id="pg-merge")
                c["merge_msg"] = gr.Markdown(elem_id="pg-merge-msg")
        with gr.Column(scale=3):
            c["pg_prompt"] = gr.Textbox(initial.get("pg_prompt") or "", label="Prompt", lines=2, elem_id="pg-prompt",
                                        placeholder="a photo of sks dog on the beach")
            c["pg_negative"] = gr.Textbox("", label="Negative prompt", elem_id="pg-negative")
            with gr.Row():
                c["pg_seed"] = gr.Number(7, label="Seed", precision=0, elem_id="pg-seed")
                c["pg_steps"] = gr.Number(25, label="Steps", precision=0, minimum=1, elem_id="pg-steps")
                c["pg_guidance"] = gr.Number(7.5, label="Guidance", minimum=0, step=0.5, elem_id="pg-guidance")
                for side in ("width", "height"):
                    c[f"pg_{side}"] = gr.Number(0, label=f"{side.capitalize()} (px)", precision=0, minimum=0, step=8,
                                                elem_id=f"pg-{side}", info="0: the model's own.")
            with gr.Row():
                c["generate_btn"] = gr.Button("Generate", variant="primary", elem_id="pg-generate")
                c["compare_btn"] = gr.Button("Compare: off / on / strengths", elem_id="pg-compare")
            c["pg_image"] = gr.Image(label="Result", type="filepath", height=360, elem_id="pg-image",
                                     interactive=False)
            c["pg_info"] = gr.Markdown(elem_id="pg-info")
    c["pg_grid"] = gr.Gallery(label="Compare (same seed): adapters off, then every weight × strength", columns=6,
                              height=260, object_fit="contain", elem_id="pg-grid")
    # Each result has its own caption: the grid's settings never overwrite the caption of the image above.
    c["pg_grid_info"] = gr.Markdown(elem_id="pg-grid-info")
    c["live_state"] = gr.State(None)
    return c


# --------------------------------------------------------------------------- handlers

def generate(ctx: Ctx, **values) -> dict:
    images, spec, labels, weights = run_generation(ctx, values, (1.0,))
    info = settings_text(values, labels, weights)
    path = ctx.playground.save(images[0], ctx.playground_dir,
                               {"prompt": values["pg_prompt"], "negative_prompt": values["pg_negative"],
                                "base": spec, "settings": info, "seed": int(values["pg_seed"])})
    return {"pg_image": str(path), "pg_info": f"{info} · saved as `{path}`"}


def compare(ctx: Ctx, **values) -> dict:
    images, _, labels, weights = run_generation(ctx, values, STRENGTHS)
    if not labels:
        raise UserError("Choose at least one adapter to compare with the base model.")
    captions = ["adapters off" if s == 0 else f"strength ×{s:g}" + (" (as set)" if s == 1 else "")
                for s in STRENGTHS]
    return {"pg_grid": list(zip(images, captions)), "pg_grid_info": settings_text(values, labels, weights)}


def adapter_lists(ctx: Ctx) -> dict:
    choices = adapter_choices(ctx)
    return {name: gr.update(choices=choices) for name in SLOT_NAMES}


def do_import(ctx: Ctx, import_file) -> dict:
    if not import_file:
        return {}
    path = import_adapter(ctx.workspace, import_file)
    return {**adapter_lists(ctx), "import_msg": f"Imported `{path.name}`: choose it in a slot."}


def info(ctx: Ctx, **chosen) -> dict:
    lines = []
    for value in chosen.values():
        if value and value != LIVE:
            try:
                lines.append("- " + describe(read_adapter(value)))
            except ModelLoadError as e:
                lines.append(f"- {e}")
    return {"adapter_info": "\n".join(lines)}


def export(ctx: Ctx, adapter_1) -> dict:
    if not adapter_1 or adapter_1 == LIVE:
        raise UserError("Choose a saved adapter in slot 1 first (a finished or stopped run, or an imported file).")
    source = Path(adapter_1)
    out = export_adapter(source, ctx.workspace / "exports" / f"{source.stem}-kohya.safetensors")
    return {"export_file": gr.update(value=str(out), visible=True),
            "import_msg": f"Exported `{out.name}` to `{out.parent}`. {where_to_use(read_adapter(source).type)}"}


def merge(ctx: Ctx, merge_into, merge_name, merge_rank, **values) -> dict:
    name = check_name(merge_name or "", "merged file")
    chosen = [(values[f"adapter_{i}"], float(values[f"weight_{i}"] or 0.0)) for i in range(1, SLOTS + 1)
              if values.get(f"adapter_{i}")]
    if not chosen or any(path == LIVE for path, _ in chosen):
        raise UserError("Choose saved adapters in the slots to merge (a live run cannot be merged: stop it first).")
    spec = base_spec(values["pg_base_choice"], values["pg_base_other"])
    folder = ctx.workspace / (IMPORTED_DIR if merge_into == "lora" else "models")
    target = folder / (name if merge_into == "folder" else f"{name}.safetensors")
    if target.exists():
        raise UserError(f"{target} already exists: choose another name.")
    if merge_into == "lora":
        out = merge_loras(chosen, target, base_spec=spec, rank=int(merge_rank or 0) or None,
                          allow_pickle=ctx.allow_pickle)
        return {"merge_msg": f"Saved `{out}`: choose it in a slot like any adapter."}
    out = merge_to_model(spec, chosen, target, allow_pickle=ctx.allow_pickle)
    return {"merge_msg": f"Saved the merged model as `{out}`. To use it, choose *Other* as the base model "
                         "and give this path."}


def note(ctx: Ctx, live_state=None, **slots) -> dict:
    """The line saying whether a paused run's live adapter can be tried here, and the slots' choices offering it
    only while a run is paused (both sent only when the state changes). A slot holding the live adapter when it is
    withdrawn is emptied: Gradio refuses a value missing from the choices a tab was sent, in its own words."""
    snap = ctx.session.snapshot()
    state = snap["state"]
    signature = (state, snap["step"] if state == "paused" else 0)
    if signature == live_state:
        return {}
    if state == "paused":
        text = (f"**Training is paused at step {snap['step']}.** Choose *{LIVE_LABEL}* in a slot to test its "
                "adapter as it is now, then press **Resume** on the Train tab.")
    elif state in ("running", "stopping"):
        text = "Training is running: pause it on the Train tab to test its adapter here."
    else:
        text = ""
    paused_changed = (live_state or (None,))[0] == "paused" or state == "paused"
    lists = adapter_lists(ctx) if live_state is not None and paused_changed else {}
    if lists and state != "paused":
        lists |= {name: gr.update(choices=lists[name]["choices"], value="") for name, value in slots.items()
                  if value == LIVE}
    return {"live_note": text, "live_state": signature, **lists}


# --------------------------------------------------------------------------- events

SLOT_NAMES = tuple(f"adapter_{i}" for i in range(1, SLOTS + 1))
WEIGHT_NAMES = tuple(f"weight_{i}" for i in range(1, SLOTS + 1))
BASE_IN = ("pg_base_choice", "pg_base_other")
FIELDS_IN = BASE_IN + ("pg_prompt", "pg_negative", "pg_seed", "pg_steps", "pg_guidance", "pg_width", "pg_height",
                       "pg_quantize") \
    + SLOT_NAMES + WEIGHT_NAMES
MERGE_IN = ("merge_into", "merge_name", "merge_rank") + BASE_IN + SLOT_NAMES + WEIGHT_NAMES

EVENTS = [  # (trigger, handler, inputs, outputs[, options])
    ("generate_btn.click", generate, FIELDS_IN, ("pg_image", "pg_info"), {"api_name": "playground_generate"}),
    ("compare_btn.click", compare, FIELDS_IN, ("pg_grid", "pg_grid_info"), {"api_name": "playground_compare"}),
    ("refresh_btn.click", adapter_lists, (), SLOT_NAMES, {"api_name": "playground_adapters"}),
    ("import_file.upload", do_import, ("import_file",), SLOT_NAMES + ("import_msg",), {"api_name": "import_adapter"}),
    *[(f"{slot}.change", info, SLOT_NAMES, ("adapter_info",),
       {"show_progress": "hidden"} | ({"api_name": "adapter_info"} if slot == "adapter_1" else {}))
      for slot in SLOT_NAMES],
    ("export_btn.click", export, ("adapter_1",), ("export_file", "import_msg"), {"api_name": "export_adapter"}),
    ("merge_btn.click", merge, MERGE_IN, ("merge_msg",), {"api_name": "merge_adapters"}),
]


def wire(ctx: Ctx, c: dict) -> TabParts:
    events = bind_table(ctx, c, EVENTS)
    slots = pick(c, SLOT_NAMES)
    bind(ctx, events["merge_adapters"].success, adapter_lists, {}, slots)  # a new LoRA file joins the lists
    return TabParts(c, polls=[Handler(note, pick(c, ("live_state",) + SLOT_NAMES),
                                              pick(c, ("live_note", "live_state") + SLOT_NAMES))],
                    refreshes=[Handler(adapter_lists, {}, slots)])
