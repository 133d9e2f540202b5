"""Tests for core/config.py: the typed config tree, its checks, YAML, overrides and presets."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from core.config import (
    CONFIG_VERSION,
    PRESETS_DIR,
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS_FULL,
    Config,
    deep_merge,
    list_presets,
    load_config,
    parse_override,
    preset_dict,
    read_yaml,
    user_presets_dir,
)
from core.errors import ConfigError, UserError

# ----------------------------------------------------------------------------- defaults


def test_defaults_build_and_validate():
    cfg = Config()
    cfg.validate()
    assert cfg.version == CONFIG_VERSION
    assert Config.from_dict({}) == cfg
    assert Config.from_dict(None) == cfg
    assert cfg.adapter.type == "lora"
    assert cfg.adapter.unet_targets == UNET_TARGETS_FULL
    assert cfg.adapter.text_encoder_targets == TEXT_ENCODER_TARGETS


def test_default_lists_are_not_shared_between_configs():
    a, b = Config(), Config()
    a.adapter.unet_targets.append("extra")
    a.train.sample_prompts.append("x")
    assert "extra" not in b.adapter.unet_targets
    assert b.train.sample_prompts == []


def test_derived_text_encoder_values_fall_back_to_unet_values():
    cfg = Config.from_dict({"adapter": {"rank": 6, "alpha": 3}, "train": {"learning_rate": 2e-4}})
    assert (cfg.text_encoder_rank, cfg.text_encoder_alpha, cfg.text_encoder_learning_rate) == (6, 3.0, 2e-4)
    cfg = Config.from_dict({"adapter": {"rank": 6, "alpha": 3, "text_encoder_rank": 2, "text_encoder_alpha": 0},
                            "train": {"text_encoder_learning_rate": 1e-5}})
    # alpha 0 is a real value, not "unset"
    assert (cfg.text_encoder_rank, cfg.text_encoder_alpha, cfg.text_encoder_learning_rate) == (2, 0.0, 1e-5)


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


# ----------------------------------------------------------------------------- unknown keys and types


def test_unknown_top_level_key_is_rejected_by_name():
    with pytest.raises(ConfigError, match=r"`bogus`"):
        Config.from_dict({"bogus": 1})


@pytest.mark.parametrize("section", ["model", "data", "adapter", "train", "output"])
def test_unknown_nested_key_names_the_dotted_key(section):
    with pytest.raises(ConfigError, match=rf"`{section}\.bogus`") as info:
        Config.from_dict({section: {"bogus": 1}})
    # the message lists what is allowed there, so a typo is easy to fix
    first_field = dataclasses.fields(type(getattr(Config(), section)))[0].name
    assert first_field in str(info.value)


def test_section_that_is_not_a_mapping_is_rejected():
    with pytest.raises(ConfigError, match=r"`train`"):
        Config.from_dict({"train": 5})


@pytest.mark.parametrize(
    "d, key",
    [
        ({"train": {"max_steps": "abc"}}, "train.max_steps"),
        ({"train": {"max_steps": "400"}}, "train.max_steps"),  # quoted numbers are text, not ints
        ({"train": {"max_steps": 1.5}}, "train.max_steps"),
        ({"train": {"max_steps": True}}, "train.max_steps"),  # bool is an int subclass in Python; still wrong
        ({"data": {"center_crop": "yes"}}, "data.center_crop"),
        ({"data": {"center_crop": 1}}, "data.center_crop"),
        ({"adapter": {"type": "oft"}}, "adapter.type"),
        ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision"),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate"),
        ({"data": {"instance_prompt": 5}}, "data.instance_prompt"),
        ({"adapter": {"text_encoder_rank": "four"}}, "adapter.text_encoder_rank"),
        ({"adapter": {"unet_targets": 5}}, "adapter.unet_targets"),
        ({"adapter": {"unet_targets": ["to_q", 5]}}, "adapter.unet_targets"),
        ({"version": "1"}, "version"),
    ],
)
def test_wrong_types_name_the_key(d, key):
    with pytest.raises(ConfigError, match=f"`{re.escape(key)}`"):
        Config.from_dict(d)


def test_literal_error_lists_the_choices():
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"adapter": {"type": "oft"}})
    for choice in ("lora", "dora", "loha", "lokr"):
        assert choice in str(info.value)


def test_int_is_accepted_for_float():
    cfg = Config.from_dict({"train": {"learning_rate": 1, "prior_loss_weight": 2}, "adapter": {"alpha": 16}})
    assert cfg.train.learning_rate == 1.0 and type(cfg.train.learning_rate) is float
    assert type(cfg.train.prior_loss_weight) is float and cfg.train.prior_loss_weight == 2.0
    assert type(cfg.adapter.alpha) is float and cfg.adapter.alpha == 16.0


def test_scientific_notation_string_is_accepted_for_float():
    # YAML 1.1 reads 1e-4 (no dot) as a string
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"
    cfg = Config.from_dict({"train": {"learning_rate": "1e-4", "text_encoder_learning_rate": "5e-5"}})
    assert cfg.train.learning_rate == pytest.approx(1e-4) and type(cfg.train.learning_rate) is float
    assert cfg.train.text_encoder_learning_rate == pytest.approx(5e-5)


def test_optional_fields_take_none_and_values():
    cfg = Config.from_dict({"adapter": {"text_encoder_rank": None}, "train": {"min_snr_gamma": 5}})
    assert cfg.adapter.text_encoder_rank is None
    assert cfg.train.min_snr_gamma == 5.0 and type(cfg.train.min_snr_gamma) is float


def test_list_from_comma_string():
    cfg = Config.from_dict({"adapter": {"unet_targets": "to_q, to_k ,to_v,", "text_encoder_targets": "q_proj"}})
    assert cfg.adapter.unet_targets == ["to_q", "to_k", "to_v"]
    assert cfg.adapter.text_encoder_targets == ["q_proj"]


def test_list_from_tuple_and_list():
    cfg = Config.from_dict({"adapter": {"unet_targets": ("to_q", "to_k")}, "train": {"sample_prompts": ["a, b"]}})
    assert cfg.adapter.unet_targets == ["to_q", "to_k"]
    assert cfg.train.sample_prompts == ["a, b"]  # a real list is kept as given: commas inside prompts survive


# ----------------------------------------------------------------------------- validate()


@pytest.mark.parametrize(
    "d, key",
    [
        ({"data": {"resolution": 500}}, "data.resolution"),
        ({"data": {"resolution": 0}}, "data.resolution"),
        ({"adapter": {"rank": 0}}, "adapter.rank"),
        ({"adapter": {"rank": -4}}, "adapter.rank"),
        ({"train": {"sample_every": -1}}, "train.sample_every"),
        ({"train": {"checkpoint_every": -5}}, "train.checkpoint_every"),
        ({"train": {"max_steps": 0}}, "train.max_steps"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"learning_rate": 0}}, "train.learning_rate"),
        ({"train": {"prior_loss_weight": -1.0}}, "train.prior_loss_weight"),
        ({"data": {"num_class_images": -1}}, "data.num_class_images"),
        ({"data": {"class_steps": 0}}, "data.class_steps"),
        ({"adapter": {"dropout": 1.0}}, "adapter.dropout"),
        ({"adapter": {"dropout": -0.1}}, "adapter.dropout"),
        ({"adapter": {"module_dropout": 1.5}}, "adapter.module_dropout"),
        ({"adapter": {"unet_targets": []}}, "adapter.unet_targets"),
        ({"adapter": {"unet_targets": ""}}, "adapter.unet_targets"),
        ({"adapter": {"train_text_encoder": True, "text_encoder_targets": []}}, "adapter.text_encoder_targets"),
    ],
)
def test_validate_errors_name_the_key(d, key):
    with pytest.raises(ConfigError, match=f"`{re.escape(key)}`"):
        Config.from_dict(d)


def test_resolution_message_explains_multiple_of_8():
    with pytest.raises(ConfigError, match="multiple of 8"):
        Config.from_dict({"data": {"resolution": 516}})
    assert Config.from_dict({"data": {"resolution": 520}}).data.resolution == 520


def test_edge_values_that_are_allowed():
    cfg = Config.from_dict({"adapter": {"dropout": 0.0, "module_dropout": 0.99},
                            "train": {"sample_every": 0, "checkpoint_every": 0},
                            "data": {"num_class_images": 0, "resolution": 8}})
    assert cfg.train.sample_every == 0 and cfg.data.num_class_images == 0
    # empty text encoder targets are fine while the text encoder is not trained
    assert Config.from_dict({"adapter": {"text_encoder_targets": []}}).adapter.text_encoder_targets == []


def test_version_too_new_is_rejected():
    with pytest.raises(ConfigError, match=r"version .*newer"):
        Config.from_dict({"version": CONFIG_VERSION + 1})
    assert Config.from_dict({"version": CONFIG_VERSION}).version == CONFIG_VERSION


NEWER = CONFIG_VERSION + 1
NEWER_MESSAGE = rf"has version {NEWER}: it was made by a newer version of this app"


def test_a_newer_config_with_a_new_key_is_refused_as_newer_not_as_unknown(tmp_path):
    """A newer app's config holds settings this app does not know: the version says why, not "Unknown setting"."""
    newer = {"version": NEWER, "train": {"max_steps": 5, "new_setting": 1}}
    with pytest.raises(ConfigError, match=NEWER_MESSAGE) as built:
        Config.from_dict(newer)
    assert "Unknown setting" not in str(built.value)
    path = tmp_path / "from-the-future.yaml"
    path.write_text(yaml.safe_dump(newer), encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"from-the-future\.yaml {NEWER_MESSAGE}"):  # names the file
        load_config(path)
    with pytest.raises(ConfigError, match=rf"from-the-future\.yaml {NEWER_MESSAGE}"):  # also past a preset
        load_config(path, preset="sd15-lora")


def test_a_config_of_this_version_with_an_unknown_key_is_an_unknown_setting(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(f"version: {CONFIG_VERSION}\ntrain:\n  new_setting: 1\n", encoding="utf-8")
    for load in (lambda: load_config(path), lambda: Config.from_dict(read_yaml(path))):
        with pytest.raises(ConfigError, match=r"Unknown setting `train\.new_setting`") as info:
            load()
        assert "newer" not in str(info.value)


def test_validate_catches_values_changed_after_building():
    cfg = Config()
    cfg.data.resolution = 100
    with pytest.raises(ConfigError, match=r"`data\.resolution`"):
        cfg.validate()


# ----------------------------------------------------------------------------- YAML round trip


def _non_default_config() -> Config:
    return Config.from_dict({
        "model": {"base": "/models/my model.safetensors", "prediction_type": "v_prediction", "revision": "fp16"},
        "data": {"instance_dir": "imgs", "instance_prompt": "a photo of sks dog: yes, 'quoted'",
                 "class_prompt": "a photo of a dog", "resolution": 768, "class_guidance": 6},
        "adapter": {"type": "lokr", "rank": 4, "alpha": 2.5, "unet_targets": ["to_q", "to_v"],
                    "train_text_encoder": True, "text_encoder_rank": 2, "decompose_both": True},
        "train": {"learning_rate": "1e-4", "adam_epsilon": 1e-8, "min_snr_gamma": 5, "sample_prompts": ["a", "b: c"],
                  "mixed_precision": "bf16", "seed": 7},
        "output": {"dir": "out", "name": "run1"},
    })


@pytest.mark.parametrize("cfg", [Config(), _non_default_config()], ids=["defaults", "custom"])
def test_to_yaml_round_trips(cfg):
    text = cfg.to_yaml()
    again = Config.from_dict(yaml.safe_load(text))
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_to_dict_is_plain_nested_dicts():
    d = _non_default_config().to_dict()
    assert d["adapter"]["type"] == "lokr" and d["train"]["sample_prompts"] == ["a", "b: c"]
    assert set(d) == {"version", "model", "data", "adapter", "train", "output"}


# ----------------------------------------------------------------------------- overrides and merging


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train.max_steps=400", {"train": {"max_steps": 400}}),
        ("train.learning_rate=0.0002", {"train": {"learning_rate": 0.0002}}),
        ("adapter.alpha=4.5", {"adapter": {"alpha": 4.5}}),
        ("adapter.train_text_encoder=true", {"adapter": {"train_text_encoder": True}}),
        ("data.center_crop=false", {"data": {"center_crop": False}}),
        ("adapter.unet_targets=[to_q, to_k]", {"adapter": {"unet_targets": ["to_q", "to_k"]}}),
        ("data.instance_prompt=a photo of sks dog", {"data": {"instance_prompt": "a photo of sks dog"}}),
        ("data.instance_prompt=a=b=c", {"data": {"instance_prompt": "a=b=c"}}),
        ("model.revision=null", {"model": {"revision": None}}),
        ("model.revision=~", {"model": {"revision": None}}),
        ("data.class_prompt=", {"data": {"class_prompt": ""}}),
        (" train.seed = 3", {"train": {"seed": 3}}),
        ("version=1", {"version": 1}),
        ("a.b.c=1", {"a": {"b": {"c": 1}}}),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_parse_override_keeps_text_that_yaml_cannot_read():
    assert parse_override("data.instance_prompt=[unclosed") == {"data": {"instance_prompt": "[unclosed"}}
    # a YAML comment would read as null: the user meant the text
    assert parse_override("data.instance_prompt=#tag") == {"data": {"instance_prompt": "#tag"}}


def test_parse_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.max_steps")


def test_overrides_feed_from_dict():
    cfg = Config.from_dict(deep_merge(parse_override("train.learning_rate=1e-4"),
                                      parse_override("adapter.unet_targets=to_q,to_k")))
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.adapter.unet_targets == ["to_q", "to_k"]


def test_deep_merge_merges_nested_and_replaces_leaves():
    base = {"train": {"max_steps": 1, "seed": 2}, "adapter": {"unet_targets": ["a", "b"]}}
    over = {"train": {"seed": 3}, "adapter": {"unet_targets": ["c"]}, "output": {"dir": "x"}}
    merged = deep_merge(base, over)
    assert merged == {"train": {"max_steps": 1, "seed": 3}, "adapter": {"unet_targets": ["c"]}, "output": {"dir": "x"}}
    assert base == {"train": {"max_steps": 1, "seed": 2}, "adapter": {"unet_targets": ["a", "b"]}}  # not mutated


def test_load_config_merge_order(tmp_path):
    # defaults < preset < file < --set
    path = tmp_path / "my.yaml"
    path.write_text("preset: sd15-loha\nadapter:\n  rank: 4\n  alpha: 2\ntrain:\n  max_steps: 123\n", encoding="utf-8")
    cfg = load_config(path, overrides=["adapter.alpha=1", "train.seed=9"])
    preset = preset_dict("sd15-loha")
    defaults = Config()
    assert cfg.adapter.type == "loha"  # from the preset
    assert cfg.data.num_class_images == preset["data"]["num_class_images"] != defaults.data.num_class_images
    assert cfg.train.learning_rate == pytest.approx(preset["train"]["learning_rate"]) != defaults.train.learning_rate
    assert cfg.adapter.rank == 4 != preset["adapter"]["rank"]  # file over preset
    assert cfg.train.max_steps == 123
    assert cfg.adapter.alpha == 1.0  # --set over file (2) and preset (8)
    assert cfg.train.seed == 9
    assert cfg.train.adam_beta1 == defaults.train.adam_beta1  # untouched default
    assert cfg.data.class_steps == defaults.data.class_steps


def test_later_overrides_win(tmp_path):
    cfg = load_config(overrides=["train.max_steps=10", "train.max_steps=20"])
    assert cfg.train.max_steps == 20


def test_load_config_preset_argument_and_files_own_preset(tmp_path):
    assert load_config(preset="sd15-lokr").adapter.type == "lokr"
    path = tmp_path / "c.yaml"
    path.write_text("preset: sd15-loha\n", encoding="utf-8")
    assert load_config(path, preset="sd15-lokr").adapter.type == "loha"  # the file's own preset wins
    plain = tmp_path / "plain.yaml"
    plain.write_text("train:\n  seed: 5\n", encoding="utf-8")
    cfg = load_config(plain, preset="sd15-lokr")
    assert cfg.adapter.type == "lokr" and cfg.train.seed == 5


def test_load_config_without_anything_gives_defaults():
    assert load_config() == Config()


def test_load_config_rejects_unknown_preset_and_keys(tmp_path):
    with pytest.raises(ConfigError, match="No preset named 'nope'"):
        load_config(preset="nope")
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_step: 5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"`train\.max_step`"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"`train\.bogus`"):
        load_config(overrides=["train.bogus=1"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_steps: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(path)


def test_empty_yaml_file_is_an_empty_config(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert read_yaml(path) == {}
    assert load_config(path) == Config()


# ----------------------------------------------------------------------------- presets


PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def user_preset(workspace: Path, name: str, text: str) -> Path:
    path = user_presets_dir(workspace) / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_user_presets_follow_the_built_in_ones_which_win_a_shared_name(tmp_path):
    user_preset(tmp_path, "aaa-mine", "adapter:\n  rank: 3\n")
    user_preset(tmp_path, "sd15-lora", "adapter:\n  rank: 5\n")  # shadowed by the built-in preset
    assert list_presets(tmp_path) == PRESETS + ["aaa-mine"]
    assert list_presets() == PRESETS  # without a workspace: the built-in ones only
    assert preset_dict("aaa-mine", tmp_path) == {"adapter": {"rank": 3}}
    assert load_config(preset="sd15-lora", workspace=tmp_path).adapter.rank == preset_dict("sd15-lora")["adapter"]["rank"]
    with pytest.raises(ConfigError, match=r"No preset named 'aaa-mine'\."):  # the user's need their workspace
        load_config(preset="aaa-mine")
    with pytest.raises(ConfigError, match=r"No preset named '\.\./x'\. Presets: .*aaa-mine"):
        load_config(preset="../x", workspace=tmp_path)


def test_the_app_and_the_command_line_resolve_a_user_preset_alike(tmp_path):
    import app
    from ui import form

    user_preset(tmp_path, "mine", f"version: {CONFIG_VERSION}\ndescription: mine\nadapter:\n  type: loha\n  rank: 3\n")
    args = app.build_parser().parse_args(["--workspace", str(tmp_path), "train", "--preset", "mine"])
    cli = app.config_from_args(args)
    assert cli.adapter.type == "loha" and cli.adapter.rank == 3
    # the same settings; only where runs go differs: the command line's --workspace, the app's form (from its workspace)
    assert cli.output.dir == str(tmp_path / "runs")
    gui = form.preset_config(tmp_path, "mine")
    assert {k: v for k, v in gui.items() if k != "output"} == {k: v for k, v in cli.to_dict().items() if k != "output"}
    assert "mine" in form.preset_names(tmp_path)


def test_a_newer_user_preset_is_refused_as_newer_by_the_app_and_the_command_line(tmp_path):
    from ui import form

    path = user_preset(tmp_path, "future", f"version: {NEWER}\nadapter:\n  new_setting: 1\n")
    for load in (lambda: load_config(preset="future", workspace=tmp_path), lambda: form.preset_config(tmp_path, "future")):
        with pytest.raises(ConfigError, match=rf"{re.escape(str(path))} {NEWER_MESSAGE}"):
            load()


def test_there_are_presets_for_every_adapter_type():
    assert list_presets() == PRESETS
    assert {p.rsplit("-", 1)[-1] for p in PRESETS} >= {"lora", "dora", "loha", "lokr"}


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_lycoris_presets_train_at_the_rates_the_demo_measured_against_lora(model):
    """What the demo measured (issue 16) carried to the real models: LoHa at 6x and LoKr at 12x LoRA's learning
    rate (at LoRA's rate they learn little), every text encoder at or below its UNet's rate."""
    lora = load_config(preset=f"{model}-lora" if model == "sd15" else f"{model}-lora-24gb").train.learning_rate
    demo_lora = load_config(preset="demo-lora").train.learning_rate
    for kind, times in (("loha", 6), ("lokr", 12)):
        assert load_config(preset=f"{model}-{kind}").train.learning_rate == pytest.approx(times * lora)
        assert load_config(preset=f"demo-{kind}").train.learning_rate == pytest.approx(times * demo_lora)
    for name in PRESETS:
        cfg = load_config(preset=name)
        if name.startswith(model) and cfg.adapter.train_text_encoder:
            assert cfg.text_encoder_learning_rate <= cfg.train.learning_rate, name


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_is_consistent(name):
    raw = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    assert isinstance(raw.get("version"), int) and raw["version"] <= CONFIG_VERSION
    assert isinstance(raw.get("description"), str) and raw["description"].strip()
    assert isinstance(raw.get("model", {}).get("base"), str) and raw["model"]["base"].strip()
    cfg = load_config(preset=name)
    assert cfg.adapter.type == re.sub(r"-(lowvram|\d+gb)$", "", name).rsplit("-", 1)[-1]  # <model>-<type>[-lowvram|-<N>gb]
    assert cfg.model.base == raw["model"]["base"]
    # every key the preset sets shows up in the config (nothing silently dropped)
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                got = getattr(getattr(cfg, section), key)
                assert got == value or (isinstance(value, (int, float)) and got == pytest.approx(value)), (section, key)


# ----------------------------------------------------------------------------- keys named in the spec


SPEC_KEYS = [
    "model.base",
    "data.instance_dir", "data.instance_prompt", "data.class_dir", "data.class_prompt",
    "data.num_class_images", "data.resolution",
    "adapter.type", "adapter.rank", "adapter.alpha", "adapter.train_text_encoder",
    "train.max_steps", "train.learning_rate", "train.batch_size", "train.prior_preservation",
    "train.prior_loss_weight", "train.mixed_precision", "train.seed", "train.sample_every",
    "train.checkpoint_every",
    "output.dir",
]


@pytest.mark.parametrize("key", SPEC_KEYS)
def test_spec_key_exists(key):
    section, name = key.split(".")
    cfg = Config()
    assert name in {f.name for f in dataclasses.fields(getattr(cfg, section))}
    value = getattr(getattr(cfg, section), name)
    # the key is accepted by from_dict and by a --set override with its default value
    assert getattr(getattr(Config.from_dict({section: {name: value}}), section), name) == value
    text = f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
    assert getattr(getattr(load_config(overrides=[text]), section), name) == value


def test_spec_key_values_are_sensible_defaults():
    cfg = Config()
    assert cfg.data.resolution == 512 and cfg.data.num_class_images > 0
    assert cfg.train.prior_preservation is True and cfg.train.mixed_precision == "auto"
    assert cfg.adapter.rank > 0 and cfg.adapter.alpha > 0
    assert Path(cfg.output.dir).name


@pytest.mark.parametrize("name", ["../x", "../../etc", "a/b", "/tmp/run", "..\\x", "..", "."])
def test_run_name_must_be_a_plain_folder_name(name):
    # the app's run-name box fills output.name; "../x" would put the run folder outside the workspace
    with pytest.raises(ConfigError, match=r"`output\.name` must be a plain folder name"):
        Config.from_dict({"output": {"name": name}})


def test_plain_run_names_are_accepted():
    for name in ("", "rex-v1", "my run 2", "a.b", "...x"):
        assert Config.from_dict({"output": {"name": name}}).output.name == name
