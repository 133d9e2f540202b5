"""Class images tab: generate the prior-preservation images with the base model, review, reject, top up."""
from __future__ import annotations

import gradio as gr

from core import datasets as ds
from core.buckets import Size, describe
from core.class_images import class_dir_for, class_sets, reject_class_images, usable_class_images
from core.data import scan_folder
from core.errors import DataError, UserError
from core.words import count

from .common import (Ctx, Handler, TabParts, bind_table, error_html, model_picker, pick, progress_html,
                     settings_problem)
from .dataset_tab import SHAPE_IN, names_of, on_select
from .form import form_config, widget

CLASS_FIELDS = ("class_prompt", "num_class_images", "class_steps", "class_guidance", "class_seed", "class_batch_size",
                "class_negative_prompt")
GALLERY_LIMIT = 200
SEP = " · "  # between a gallery caption's size and file name


def class_config(ctx: Ctx, values: dict):
    """A config holding what class images depend on: base model, class settings, resolution, bucket settings."""
    cfg = form_config(values, ctx.workspace, allow_pickle=ctx.allow_pickle)
    if not cfg.data.class_prompt.strip():
        raise DataError("Enter a class prompt first, e.g. 'a photo of a dog' (the Dataset tab fills it in from the "
                        "class noun).")
    return cfg


def dataset_sizes(ctx: Ctx, cfg, dataset) -> list[Size]:
    """The (width, height) of the images training would use from the chosen dataset; none without a dataset."""
    try:
        folder = ds.dataset_dir(ctx.workspace, dataset)
    except UserError:
        return []  # no dataset (yet): the resolution's square, as a run without images would need
    return [(i.width, i.height) for i in scan_folder(folder, min_size=cfg.data.min_image_size).images]


def class_plan(ctx: Ctx, values: dict) -> tuple:
    """The config and the (size, how many) sets of class images training would use with the chosen dataset."""
    cfg = class_config(ctx, values)
    return cfg, class_sets(cfg, dataset_sizes(ctx, cfg, values.get("dataset")))


def caption(size: Size, name: str) -> str:
    """A gallery caption, e.g. '48x80 · class_00001.png': the names repeat in every size's folder."""
    return f"{describe(size)}{SEP}{name}"


def selected_by_size(selection: list[str], sets: list) -> dict[Size, list[str]]:
    """The selected captions as file names per set. The size must be one of the sets (no folder comes from the
    browser); a bare name stands for the only set when there is one."""
    sizes = {describe(size): size for size, _ in sets}
    out: dict[Size, list[str]] = {}
    for entry in selection:
        label, sep, name = entry.partition(SEP.strip())
        size = sizes.get(label.strip()) if sep else (sets[0][0] if len(sets) == 1 else None)
        if size is not None:
            out.setdefault(size, []).append((name if sep else label).strip())
    return out


def class_view(ctx: Ctx, values: dict) -> dict:
    """The cached images for these settings, set by set, and a line saying how many there are and where.

    It runs while the user edits the settings (a base model of "Other" not typed in yet, a number being typed), so
    a setting that is not usable yet is said here; the pop-up is left to Generate."""
    try:
        cfg, sets = class_plan(ctx, values)
    except UserError as e:
        return {"class_info": settings_problem(e), "class_gallery": []}
    found = [(size, want, usable_class_images(cfg, size)) for size, want in sets]
    ready = sum(min(len(items), want) for _, want, items in found)
    want = sum(want for _, want, _ in found)
    folders = ", ".join(f"`{class_dir_for(cfg, size)}`" for size, _ in sets)
    if len(sets) == 1 and sets[0][0] == (cfg.data.resolution, cfg.data.resolution):
        shape = f"at {cfg.data.resolution} px"
    else:
        per_set = ", ".join(f"{describe(size)}: {min(len(items), n)} of {n}" for size, n, items in found)
        shape = f"in the dataset's bucket sizes ({per_set})"
    info = (f"**{ready} of {want}** class images ready for *{cfg.data.class_prompt}* with `{cfg.model.base}` {shape}. "
            f"They are kept in {folders} and reused by every run with the same model, prompt and size.")
    if ready < want:
        info += " Press **Generate** to make the rest (training also makes them when it starts)."
    shown = [(str(i.path), caption(size, i.path.name)) for size, _, items in found for i in items]
    return {"class_info": info, "class_gallery": shown[:GALLERY_LIMIT]}


def job_view(ctx: Ctx) -> dict:
    s = ctx.class_job.snapshot()
    state = s["state"]
    if state == "idle":
        progress = ""
    elif state == "failed":
        progress = error_html(s["error"])
    else:
        made = f"{s['done']} / {s['total']} new images"
        done = s["done"]
        if state == "running":
            label, detail = ("Stopping" if s["stopping"] else "Generating"), made if s["total"] else s["message"]
            if s["steps"]:  # a batch is being made: its denoising steps move the bar
                detail += f"; making the next {count(s['batch'], 'image')}: step {s['step']} / {s['steps']}"
                done += s["batch"] * s["step"] / s["steps"]
        elif state == "finished":
            label, detail = "Done", made if s["total"] else "all the images were already there"
        else:
            label, detail = "Stopped", f"{made}; press Generate to continue where it stopped"
        progress = progress_html(label, done, s["total"] or (1 if state == "finished" else 0), detail, state)
    busy = ctx.class_job.busy
    return {"class_progress": progress, "class_generate_btn": gr.update(interactive=not busy),
            "class_stop_btn": gr.update(interactive=busy)}


def build(ctx: Ctx, initial: dict) -> dict:
    c: dict = {}
    gr.Markdown("**Prior preservation.** The base model draws ordinary pictures of the class (*a photo of a dog*); "
                "training keeps doing those right while it learns your subject, so the model does not forget what "
                "a dog looks like. Optional: turn it off on the Train tab.", elem_classes="db-note")
    c["base_choice"], c["base_other"] = model_picker("cls", value=initial["base_choice"], other=initial["base_other"])
    with gr.Row():
        c["class_prompt"] = widget("class_prompt", initial, label="Class prompt", scale=3, elem_id="cls-prompt",
                                   placeholder="a photo of a dog",
                                   info="The Dataset tab fills this in from the class noun.")
        c["num_class_images"] = widget("num_class_images", initial, label="How many", scale=1, elem_id="cls-count")
    with gr.Accordion("Generation settings", open=False):
        with gr.Row():
            c["class_steps"] = widget("class_steps", initial, label="Sampling steps", elem_id="cls-steps")
            c["class_guidance"] = widget("class_guidance", initial, label="Guidance", elem_id="cls-guidance")
            c["class_seed"] = widget("class_seed", initial, label="First seed", elem_id="cls-seed")
            c["class_batch_size"] = widget("class_batch_size", initial, label="Batch size", elem_id="cls-batch")
        c["class_negative_prompt"] = widget("class_negative_prompt", initial, label="Negative prompt",
                                            elem_id="cls-negative")
    c["class_info"] = gr.Markdown(elem_id="cls-info")
    with gr.Row():
        c["class_generate_btn"] = gr.Button("Generate", variant="primary", elem_id="cls-generate")
        c["class_stop_btn"] = gr.Button("Stop", variant="stop", interactive=False, elem_id="cls-stop")
    c["class_progress"] = gr.HTML(elem_id="cls-progress")
    c["class_gallery"] = gr.Gallery(label="Class images: click the bad ones to select them", columns=8, height=360,
                                    allow_preview=False, object_fit="cover", elem_id="cls-gallery")
    with gr.Row(elem_classes="db-bottom"):
        c["class_selected"] = gr.Textbox("", label="Selected", scale=4, elem_id="cls-selected")
        c["class_reject_btn"] = gr.Button("Reject selected and top up", scale=0, min_width=300, elem_id="cls-reject")
    c["class_last_done"] = gr.State(-1)
    return c


# --------------------------------------------------------------------------- handlers

# Each handler names `dataset` with a default: with no dataset picked yet the dropdown holds None, which Gradio's
# API would otherwise make a required argument (an API call without a dataset means: the resolution's square).

def view(ctx: Ctx, dataset=None, **values) -> dict:
    return class_view(ctx, {**values, "dataset": dataset})


def generate(ctx: Ctx, dataset=None, **values) -> dict:
    values["dataset"] = dataset
    if ctx.session.busy:
        raise DataError("Training is running; generate class images when it has finished (or stop it).")
    ctx.class_job.start(*class_plan(ctx, values))
    return {**job_view(ctx), **class_view(ctx, values)}


def stop(ctx: Ctx) -> dict:
    ctx.class_job.stop()
    return job_view(ctx)


def reject(ctx: Ctx, class_selected, dataset=None, **values) -> dict:
    values["dataset"] = dataset
    names = names_of(class_selected)
    if not names:
        raise DataError("Select images first: click them in the gallery.")
    if ctx.class_job.busy:
        raise DataError("Wait for the generation to finish (or stop it) before rejecting images.")
    cfg, sets = class_plan(ctx, values)
    moved = [name for size, chosen in selected_by_size(names, sets).items()
             for name in reject_class_images(class_dir_for(cfg, size), chosen)]
    out = {"class_selected": ""}
    if moved and not ctx.session.busy:
        ctx.class_job.start(cfg, sets)  # top up to the counts: only the sets that lost images make new ones
    return {**out, **job_view(ctx), **class_view(ctx, values)}


def poll(ctx: Ctx, class_last_done, dataset=None, **values) -> dict:
    """While a job runs (and once after), redraw its progress and the gallery as images arrive."""
    values["dataset"] = dataset
    s = ctx.class_job.snapshot()
    if s["state"] == "idle" or (class_last_done == -2 and not ctx.class_job.busy):
        return {}
    out = job_view(ctx)
    marker = s["done"] if ctx.class_job.busy else -2
    if marker != class_last_done:
        out.update(class_view(ctx, values))
    out["class_last_done"] = marker
    return out


# --------------------------------------------------------------------------- events

# Class images are made at the sizes training uses: the dataset's buckets. The dataset, resolution and bucketing are
# on the Dataset tab, the other bucket settings on the Train tab.
FROM_OTHER_TABS = ("dataset", "resolution") + SHAPE_IN
FIELDS_IN = CLASS_FIELDS + ("base_choice", "base_other") + FROM_OTHER_TABS
VIEW_OUT = ("class_info", "class_gallery")
JOB_OUT = ("class_progress", "class_generate_btn", "class_stop_btn")
HIDDEN = {"show_progress": "hidden"}

EVENTS = [  # (trigger, handler, inputs, outputs[, options])
    ("class_prompt.blur", view, FIELDS_IN, VIEW_OUT, {"api_name": "class_view"}),
    *[(f"{name}.change", view, FIELDS_IN, VIEW_OUT, HIDDEN)
      for name in ("num_class_images", "base_choice", "base_other") + FROM_OTHER_TABS],
    ("class_generate_btn.click", generate, FIELDS_IN, JOB_OUT + VIEW_OUT, {"api_name": "class_generate"}),
    ("class_stop_btn.click", stop, (), JOB_OUT, {"api_name": "class_stop"}),
    ("class_reject_btn.click", reject, FIELDS_IN + ("class_selected",), ("class_selected",) + JOB_OUT + VIEW_OUT,
     {"api_name": "class_reject"}),
]


def wire(ctx: Ctx, c: dict) -> TabParts:
    """Bind the tab's events; `c` also holds the other tabs' FROM_OTHER_TABS (class images are made at the sizes
    of the dataset's buckets)."""
    bind_table(ctx, c, EVENTS)
    c["class_gallery"].select(on_select, c["class_selected"], c["class_selected"], api_visibility="undocumented",
                              show_progress="hidden")
    return TabParts(c, polls=[Handler(poll, pick(c, FIELDS_IN + ("class_last_done",)),
                                      pick(c, JOB_OUT + VIEW_OUT + ("class_last_done",)))],
                    refreshes=[Handler(view, pick(c, FIELDS_IN), pick(c, VIEW_OUT))])
