"""Dataset tab: named datasets of copied images, a validation report with crop previews, captions, prompts."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core import buckets, datasets as ds, demo
from core.config import DataConfig
from core.data import ImageSet, scan_folder
from core.errors import DataError, UserError
from core.words import count

from .common import Ctx, Handler, TabParts, bind_table
from .form import BY_NAME, form_config, in_field_names, to_number, widget

MIN_SIZE = DataConfig().min_image_size
DEMO_DATASET = "demo-star"
DEMO_SUBJECT = demo.SUBJECT_DIR  # the two-colour star the demo presets train on
CROPS_SHOWN = 24


def dataset_view(ctx: Ctx, dataset: str, resolution, **bucket) -> dict:
    """Thumbnails, validation report, training-crop previews and the caption table of one dataset; `bucket` holds
    the bucket settings of the form (BUCKET_IN; those left out: the defaults)."""
    empty = pd.DataFrame({"file": [], "caption": []})
    if not dataset:
        return {"gallery": gr.update(value=[], label="Images"), "crops": [], "captions": empty,
                "report": "Create a dataset, or pick one from the list."}
    folder = ds.dataset_dir(ctx.workspace, dataset)
    scan = scan_folder(folder, min_size=MIN_SIZE)
    data, problem = view_settings(ctx, resolution, bucket)
    n = len(scan.images)
    uncaptioned = [i for i in scan.images if not i.caption]
    head = f"**{count(n, 'usable image')}** in `{folder}`"
    if n:
        # a rule, not a claim that the prompt exists (a new dataset has none until its words are filled in)
        head += (f" ({n - len(uncaptioned)} with their own caption, {len(uncaptioned)} without one: those train on "
                 "the instance prompt below).")
    lines = [head]
    if not n:
        lines.append("Add 3-20 photos of your subject: varied angles, backgrounds and light help.")
    elif n < 3:
        lines.append("3-20 photos work best; with fewer the adapter copies them closely.")
    if scan.rejected:
        lines.append("**Rejected, not used for training:**\n" +
                     "\n".join(f"- `{r.path.name}`: {r.reason}" for r in scan.rejected))
    crops = []
    if problem:
        lines.append(f"**Check the settings:** {in_field_names(problem)}")
    elif n:
        assigned = buckets.assign_for_settings([(i.width, i.height) for i in scan.images], data)
        lines += shape_report(scan.images, assigned, data)
        shown, sizes = scan.images[:CROPS_SHOWN], assigned[:CROPS_SHOWN]
        previews = ImageSet(shown, [""] * len(shown), data.resolution, buckets=sizes)  # decoded as training does
        crops = [(previews.preview(k), f"{item.path.name} · {buckets.describe(size)}")
                 for k, (item, size) in enumerate(zip(shown, sizes))]
    gallery = [(str(i.path), i.path.name) for i in scan.images]
    captions = pd.DataFrame({"file": [i.path.name for i in scan.images],
                             "caption": [i.caption or "" for i in scan.images]})
    return {"gallery": gr.update(value=gallery, label=f"Images ({len(scan.images)})"), "report": "\n\n".join(lines),
            "crops": crops, "captions": captions}


def shape_report(images: list, assigned: list, data) -> list[str]:
    """What training makes of each image's shape: the images per bucket (or the one square), a bucket with a single
    image, and each image that is cropped or enlarged."""
    res = data.resolution
    changed = [(i, b) for i, b in zip(images, assigned) if buckets.reshaped(i.width, i.height, b)]
    plain = len(images) - len(changed)
    if data.bucketing:
        text = f"**Buckets at {res} px:** {buckets.counts_text(assigned)}. "
        text += f"{count(plain, 'image')} already in {'its' if plain == 1 else 'their'} bucket's shape: only resized. " \
            if plain else ""
    else:
        text = f"**At {res}x{res} px:** "
        text += (f"{plain} square image{'s are' if plain != 1 else ' is'} only resized. " if plain else "")
    text += ("Cropped or enlarged:" if changed else "Nothing is cropped.")
    text += "".join(f"\n- `{i.path.name}` {ds.crop_note(i, res, data.center_crop, b)}" for i, b in changed)
    single = [f"{buckets.describe(b)} has one image: it trains in batches of one." for b in buckets.lonely(assigned)]
    return [text] + single


def view_settings(ctx: Ctx, resolution, bucket: dict):
    """(the `data` settings the view follows, "") or (None, what is wrong with them): the resolution first, in its
    own words, then the bucket settings as the config checks them."""
    res, problem = resolution_or_problem(resolution)
    if problem:
        return None, problem
    try:
        return form_config({"resolution": res, **bucket}, ctx.workspace).data, ""
    except UserError as e:
        return None, str(e)


def resolution_or_problem(resolution) -> tuple[int | None, str]:
    """(the training resolution, "") or (None, what is wrong with it). The view is redrawn while the user types
    the resolution, so a value not usable yet is said in the report, not as a pop-up; Start refuses it."""
    try:
        res = to_number(BY_NAME["resolution"], resolution)
    except UserError as e:
        return None, str(e)
    if res <= 0 or res % 8:
        return None, f"The training resolution must be a positive multiple of 8, got {resolution}."
    return res, ""


def dataset_settings(ctx: Ctx, dataset: str) -> dict:
    """What the dataset remembers: identifier, class noun, instance prompt (and so the class prompt)."""
    m = ds.read_manifest(ds.dataset_dir(ctx.workspace, dataset)) if dataset else {}
    out = {"selected": "", "add_msg": ""}
    if m.get("identifier"):
        out["identifier"] = m["identifier"]
        out["token_info"] = token_info(m["identifier"])
    if m.get("class_noun") is not None:
        out["class_noun"] = m.get("class_noun", "")
    if m.get("instance_prompt"):
        out["instance_prompt"] = m["instance_prompt"]
    if m.get("class_noun"):
        out["class_prompt"] = ds.class_prompt(m["class_noun"])
    return out


def demo_dataset(ctx: Ctx, resolution, **shape) -> dict:
    """Create (or top up) the demo dataset, select it and fill in its prompts: the two-colour star."""
    names = ds.list_datasets(ctx.workspace)
    folder = ds.datasets_root(ctx.workspace) / DEMO_DATASET
    if DEMO_DATASET not in names:
        folder = ds.create_dataset(ctx.workspace, DEMO_DATASET)
    report = ds.add_folder(folder, DEMO_SUBJECT, MIN_SIZE)
    ds.update_manifest(folder, identifier=demo.SUBJECT_TOKEN, class_noun="star",
                       instance_prompt=demo.SUBJECT_PROMPT)
    return {"dataset": gr.update(choices=ds.list_datasets(ctx.workspace), value=DEMO_DATASET),
            "add_msg": f"The demo subject: a two-colour star the demo model has never seen. {report.summary()}",
            **dataset_view(ctx, DEMO_DATASET, resolution, **shape), **dataset_settings(ctx, DEMO_DATASET)}


def token_info(identifier: str) -> str:
    word = (identifier or "").strip()
    if not word:
        return "Pick an identifier: a rare word that will come to mean *your* subject."
    if " " in word:
        return "**Careful:** use one word without spaces as the identifier."
    pieces = ds.token_pieces(word)
    if len(pieces) == 1:
        return f"✓ `{word}` is a single token for the text encoder: a good identifier."
    return (f"**Careful:** the text encoder splits `{word}` into {len(pieces)} pieces ({' + '.join(pieces)}); "
            "a rare word that stays one token works better. Try the suggestions.")


def build(ctx: Ctx, initial: dict) -> dict:
    """Lay out the tab; return its components by name (the fields other tabs read are among them)."""
    c: dict = {}
    gr.Markdown("Put **3-20 photos of your subject** in a dataset. The photos are *copied* into the workspace: "
                "your originals are never changed.", elem_classes="db-note")
    with gr.Row(elem_classes="db-bottom"):
        c["dataset"] = gr.Dropdown(ds.list_datasets(ctx.workspace), value=None, label="Dataset", scale=3,
                                   elem_id="ds-dataset", info="Pick a dataset, or create a new one on the right.")
        c["new_name"] = gr.Textbox("", label="New dataset name", placeholder="e.g. rex", scale=2, elem_id="ds-new-name")
        with gr.Column(scale=1, min_width=160):
            c["create_btn"] = gr.Button("Create dataset", variant="primary", elem_id="ds-create")
            c["demo_btn"] = gr.Button("Use the demo subject", size="sm", elem_id="ds-demo")
    with gr.Row():
        c["upload"] = gr.File(file_count="multiple", file_types=["image", ".txt"], label="Add photos: drop files here",
                              height=120, elem_id="ds-upload", scale=3)
        with gr.Column(scale=2):
            c["folder"] = gr.Textbox("", label="...or add all images of a folder", placeholder="/home/me/photos/rex",
                                     elem_id="ds-folder")
            c["add_folder_btn"] = gr.Button("Add images from folder", elem_id="ds-add-folder")
    c["add_msg"] = gr.Markdown(elem_id="ds-add-msg")
    with gr.Row():
        with gr.Column(scale=3):
            c["gallery"] = gr.Gallery(label="Images", columns=6, height=300, allow_preview=False, object_fit="contain",
                                      elem_id="ds-gallery")
            with gr.Row(elem_classes="db-bottom"):
                c["selected"] = gr.Textbox("", label="Selected (click images above)", scale=4, elem_id="ds-selected")
                c["remove_btn"] = gr.Button("Remove selected", scale=0, min_width=200, elem_id="ds-remove")
        with gr.Column(scale=2):
            with gr.Row(equal_height=True):
                c["resolution"] = widget("resolution", initial, label="Training resolution (px)", scale=2,
                                         elem_id="ds-resolution")
                c["bucketing"] = widget("bucketing", initial, label="Aspect-ratio buckets", scale=1,
                                        elem_id="ds-bucketing")
            c["crops"] = gr.Gallery(label="What training sees (each photo's crop, in its bucket's shape)", columns=4,
                                    height=300,
                                    allow_preview=True, elem_id="ds-crops")
    c["report"] = gr.Markdown(elem_id="ds-report")
    gr.Markdown("### Prompt")
    with gr.Row(equal_height=True):
        c["identifier"] = gr.Textbox(ds.KNOWN_IDENTIFIERS[0], label="Identifier (a rare word)", scale=1, elem_id="ds-identifier")
        c["class_noun"] = gr.Textbox("", label="Class noun", placeholder="dog", scale=1, elem_id="ds-class-noun",
                                     info="What the subject is: dog, woman, mug...")
        c["instance_prompt"] = widget("instance_prompt", initial, label="Instance prompt", scale=2,
                                      elem_id="ds-instance-prompt")
    with gr.Row():
        c["token_info"] = gr.Markdown(token_info(ds.KNOWN_IDENTIFIERS[0]), elem_id="ds-token-info")
        c["suggest_btn"] = gr.Button("Suggest rare words", size="sm", scale=0, min_width=180, elem_id="ds-suggest")
    c["suggestions"] = gr.Radio([], label="Suggestions (click one to use it)", visible=False, elem_id="ds-suggestions")
    c["suggest_seed"] = gr.State(0)
    gr.Markdown("### Captions")
    gr.Markdown("Optional: a caption per image (saved as a .txt file beside it) overrides the instance prompt; "
                "include the identifier, e.g. *a photo of sks dog on a sofa*.", elem_classes="db-note")
    c["captions"] = gr.Dataframe(headers=["file", "caption"], datatype=["str", "str"], interactive=True,
                                 static_columns=[0], column_widths=["25%", "75%"], wrap=True, elem_id="ds-captions")
    with gr.Row():
        c["save_captions_btn"] = gr.Button("Save captions", elem_id="ds-save-captions", scale=0, min_width=160)
        c["caption_msg"] = gr.Markdown(elem_id="ds-caption-msg")
    return c


# --------------------------------------------------------------------------- handlers

def dataset_list(ctx: Ctx) -> dict:
    return {"dataset": gr.update(choices=ds.list_datasets(ctx.workspace))}


def pick(ctx: Ctx, dataset, resolution, **shape) -> dict:
    return {**dataset_view(ctx, dataset, resolution, **shape), **dataset_settings(ctx, dataset)}


def create(ctx: Ctx, new_name, resolution, **shape) -> dict:
    folder = ds.create_dataset(ctx.workspace, new_name)
    # a new subject: the previous dataset's identifier, class noun and prompt must not carry over
    identifier = ds.KNOWN_IDENTIFIERS[0]
    return {"dataset": gr.update(choices=ds.list_datasets(ctx.workspace), value=folder.name), "new_name": "",
            "add_msg": f"Created dataset **{folder.name}**. Now add photos.", "class_noun": "",
            "instance_prompt": "", "identifier": identifier, "token_info": token_info(identifier),
            **dataset_view(ctx, folder.name, resolution, **shape)}


def add_upload(ctx: Ctx, dataset, upload, resolution, **shape) -> dict:
    if not upload:
        return {}
    folder = ds.dataset_dir(ctx.workspace, dataset)
    report = ds.add_images(folder, [str(f) for f in upload], MIN_SIZE, uploaded=True)
    return {"add_msg": report.summary(), "upload": None, **dataset_view(ctx, dataset, resolution, **shape)}


def add_folder(ctx: Ctx, dataset, folder, resolution, **shape) -> dict:
    report = ds.add_folder(ds.dataset_dir(ctx.workspace, dataset), folder, MIN_SIZE)
    return {"add_msg": report.summary(), **dataset_view(ctx, dataset, resolution, **shape)}


def remove(ctx: Ctx, dataset, selected, resolution, **shape) -> dict:
    names = names_of(selected)
    if not names:
        raise DataError("Select images first: click them in the gallery.")
    moved = ds.remove_images(ds.dataset_dir(ctx.workspace, dataset), names)
    return {"add_msg": f"Removed {len(moved)} image(s) (kept in the dataset's .removed folder).", "selected": "",
            **dataset_view(ctx, dataset, resolution, **shape)}


def prompt(ctx: Ctx, dataset, identifier, class_noun) -> dict:
    out = {"instance_prompt": ds.instance_prompt(identifier, class_noun), "token_info": token_info(identifier)}
    if class_noun.strip():
        out["class_prompt"] = ds.class_prompt(class_noun)
    if dataset and out["instance_prompt"]:
        ds.update_manifest(ds.dataset_dir(ctx.workspace, dataset), identifier=identifier.strip(),
                           class_noun=class_noun.strip(), instance_prompt=out["instance_prompt"])
    return out


def follow_words(ctx: Ctx, dataset, identifier, class_noun, instance_prompt) -> dict:
    """On leaving the identifier or class-noun box: a word pasted or filled in there fires no input event, so the
    instance prompt is made from the words here too, when it is empty or still the one made from the words before
    (a prompt the user wrote is kept)."""
    m = ds.read_manifest(ds.dataset_dir(ctx.workspace, dataset)) if dataset else {}
    words_before = (str(m.get("identifier") or ""), str(m.get("class_noun") or ""))
    written = instance_prompt.strip()
    if written and (written != ds.instance_prompt(*words_before) or words_before == (identifier.strip(),
                                                                                    class_noun.strip())):
        return {}
    return prompt(ctx, dataset, identifier, class_noun)


def save_prompt(ctx: Ctx, dataset, instance_prompt) -> dict:
    if dataset and instance_prompt.strip():
        ds.update_manifest(ds.dataset_dir(ctx.workspace, dataset), instance_prompt=instance_prompt.strip())
    return {}


def suggest(ctx: Ctx, suggest_seed) -> dict:
    words = ds.suggest_identifiers(6, seed=suggest_seed)
    return {"suggestions": gr.update(choices=words, value=None, visible=True), "suggest_seed": suggest_seed + 1}


def use_suggestion(ctx: Ctx, dataset, suggestions, class_noun) -> dict:
    if not suggestions:
        return {}
    return {"identifier": suggestions, **prompt(ctx, dataset, suggestions, class_noun)}


def save_captions(ctx: Ctx, dataset, captions, resolution, **shape) -> dict:
    folder = ds.dataset_dir(ctx.workspace, dataset)
    rows = captions.to_dict("records") if hasattr(captions, "to_dict") else captions
    captions = {str(r["file"]): str(r.get("caption") or "") for r in rows if r.get("file")}
    changed = ds.write_captions(folder, captions)
    # The report counts the images with their own caption: redraw it from the files just written.
    return {"caption_msg": f"Saved: {count(changed, 'caption file')} changed.",
            **dataset_view(ctx, dataset, resolution, **shape)}


# --------------------------------------------------------------------------- events

# The settings that shape what training sees: bucketing is on this tab, beside the resolution; the rest of the
# bucket settings are among the Train tab's advanced options.
SHAPE_IN = ("bucketing", "bucket_step", "bucket_min_side", "bucket_max_side", "bucket_no_upscale")
VIEW_IN = ("dataset", "resolution") + SHAPE_IN
VIEW_OUT = ("gallery", "report", "crops", "captions")
# What picking a dataset sets from what it remembers (the class prompt is on the Class images tab).
SETTINGS_OUT = ("identifier", "class_noun", "instance_prompt", "token_info", "selected", "add_msg", "class_prompt")
CREATE_IN = ("new_name", "resolution") + SHAPE_IN
CREATE_OUT = ("dataset", "new_name", "add_msg", "class_noun", "instance_prompt", "identifier", "token_info") + VIEW_OUT
PROMPT_IN = ("dataset", "identifier", "class_noun")
PROMPT_OUT = ("instance_prompt", "token_info", "class_prompt")
TYPING = {"trigger_mode": "always_last", "show_progress": "hidden"}

EVENTS = [  # (trigger, handler, inputs, outputs[, options])
    ("dataset.input", pick, VIEW_IN, VIEW_OUT + SETTINGS_OUT, {"api_name": "dataset_view"}),
    (tuple(f"{name}.change" for name in ("resolution",) + SHAPE_IN), dataset_view, VIEW_IN, VIEW_OUT),
    ("create_btn.click", create, CREATE_IN, CREATE_OUT, {"api_name": "create_dataset"}),
    ("new_name.submit", create, CREATE_IN, CREATE_OUT),
    ("demo_btn.click", demo_dataset, ("resolution",) + SHAPE_IN, ("dataset",) + VIEW_OUT + SETTINGS_OUT,
     {"api_name": "demo_dataset"}),
    ("upload.upload", add_upload, ("dataset", "upload", "resolution") + SHAPE_IN, ("add_msg", "upload") + VIEW_OUT,
     {"api_name": "add_upload"}),
    ("add_folder_btn.click", add_folder, ("dataset", "folder", "resolution") + SHAPE_IN, ("add_msg",) + VIEW_OUT,
     {"api_name": "add_folder"}),
    ("remove_btn.click", remove, ("dataset", "selected", "resolution") + SHAPE_IN, ("add_msg", "selected") + VIEW_OUT,
     {"api_name": "remove_images"}),
    ("identifier.input", prompt, PROMPT_IN, PROMPT_OUT, {"api_name": "build_prompt", **TYPING}),
    ("class_noun.input", prompt, PROMPT_IN, PROMPT_OUT, TYPING),
    ("class_noun.blur", follow_words, PROMPT_IN + ("instance_prompt",), PROMPT_OUT, {"api_name": "follow_words"}),
    ("identifier.blur", follow_words, PROMPT_IN + ("instance_prompt",), PROMPT_OUT),
    ("instance_prompt.blur", save_prompt, ("dataset", "instance_prompt"), ()),
    ("suggest_btn.click", suggest, ("suggest_seed",), ("suggestions", "suggest_seed"),
     {"api_name": "suggest_identifiers"}),
    ("suggestions.input", use_suggestion, ("dataset", "suggestions", "class_noun"), ("identifier",) + PROMPT_OUT),
    ("save_captions_btn.click", save_captions, ("dataset", "captions", "resolution") + SHAPE_IN, ("caption_msg",) + VIEW_OUT,
     {"api_name": "save_captions"}),
]


def wire(ctx: Ctx, c: dict) -> TabParts:
    """Bind the tab's events; `c` also holds the class prompt of the Class images tab (this tab fills it in)."""
    bind_table(ctx, c, EVENTS)
    c["gallery"].select(on_select, c["selected"], c["selected"], api_visibility="undocumented",
                        show_progress="hidden")
    return TabParts(c, refreshes=[Handler(dataset_list, {}, {"dataset": c["dataset"]})])


def on_select(selected: str, evt: gr.SelectData) -> str:
    """A click on a gallery image adds its name to (or takes it out of) the selection; captions are file names."""
    value = evt.value if isinstance(evt.value, dict) else {}
    return toggle(selected, str(value.get("caption") or ""))


def names_of(text: str) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def toggle(text: str, name: str) -> str:
    names = names_of(text)
    if not name:
        return text
    names = [n for n in names if n != name] if name in names else names + [name]
    return ", ".join(names)
