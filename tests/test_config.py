import pytest

from chimle.config import Config, ConfigError, from_dict, parse_overrides, resolve


def test_presets_resolve_and_tasks_set_the_wiring():
    paper = resolve(task="super-resolution", preset="paper")
    assert paper.model.channels == [128, 64, 64, 64] and paper.data.crop == 512
    assert paper.search.samples_per_level == [200, 200, 20, 10]
    assert (paper.train.round_size, paper.train.steps_per_round, paper.train.passes) == (400, 10_000, 20)
    colour = resolve(task="colourization", preset="paper")
    assert (colour.model.wiring, colour.model.in_channels, colour.model.out_channels) == ("colourization", 1, 2)
    assert colour.data.crop == 256
    for preset in ("small", "tiny"):
        assert resolve(task="super-resolution", preset=preset).preset == preset


def test_dotted_overrides_are_typed():
    config = resolve(task="decompression", preset="tiny",
                     overrides=["model.blocks=3", "train.lr=2e-3", "search.samples_per_level=[5, 6]",
                                "data.skip_bad=true", "task=paired"])
    assert config.model.blocks == 3 and config.train.lr == 0.002 and config.search.samples_per_level == [5, 6]
    assert config.data.skip_bad is True and config.task == "paired"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.bloks=2", "unknown setting 'model.bloks'"),
        ("model.blocks=two", "'model.blocks' must be like"),
        ("model.blocks=0", "model.blocks=0 must be >= 1"),
        ("model.channels=[8]", "needs one value per level"),
        ("data.crop=30", "multiple of 2\\*\\*levels"),
        ("train.perceptual=squeeze", "'vgg' or 'alex'"),
        ("train.pixel_weight=-1", "pixel_weight=-1.0 must be >= 0"),
        ("search.precision=float16", "'float32' or 'bfloat16'"),
        ("train.precision=half", "train.precision='half' must be 'auto', 'float32' or 'bfloat16'"),
        ("search.rescore=-1", "search.rescore=-1 must be >= 0"),
        ("train", "must look like section.field=value"),
        ("model=3", "is a section"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve(task="super-resolution", preset="tiny", overrides=[override])


def test_unknown_task_and_preset():
    with pytest.raises(ValueError, match="unknown task 'painting'"):
        resolve(task="painting")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        resolve(task="super-resolution", preset="huge")


def test_yaml_file_and_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: decompression\nmodel:\n  blocks: 4\ndata:\n  jpeg_quality: 5\n")
    config = resolve(preset="tiny", file=path, overrides=["model.blocks=5"])
    assert config.task == "decompression" and config.model.blocks == 5 and config.data.jpeg_quality == 5
    import yaml

    again = from_dict(yaml.safe_load(config.to_yaml()))
    assert again == config and isinstance(again, Config)
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve(preset="tiny", file=tmp_path / "bad.yaml")


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
