"""Built-in models: the registry, `builtin:TASK` wherever a model is accepted, float16 files, no shadowing of local
paths, `--init` for fine-tuning, the wheel's size."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import chimle
from chimle import builtin
from chimle import train as training
from chimle.checkpoint import CheckpointError, initial_weights, load_model, save_model
from chimle.cli import build_parser, main
from chimle.data import save_image
from chimle.generator import Generator
from chimle.sample import Model, read_provenance
from chimle.serve import served_models
from conftest import randomize, tiny_config

FAST = ["train.rounds=1", "train.round_size=4", "train.steps_per_round=4", "train.checkpoint_every=2"]


def record(task="super-resolution", best=0.412, ratio=0.81):
    """A record as scripts/train_builtin.py writes it, with made-up numbers."""
    sets = {"builtin": {"best": 0.5, "mean": 0.6, "baseline": 0.55, "ratio_best": 0.91, "ratio_mean": 1.09,
                        "diversity": 0.21, "consistency": 38.5, "tiles": 12},
            "photos": {"best": best, "mean": 0.5, "baseline": 0.51, "ratio_best": ratio, "ratio_mean": 0.98,
                       "diversity": 0.234, "consistency": 37.0, "tiles": 51}}
    return {"name": f"builtin:{task}", "task": task, "chimle": chimle.__version__,
            "file": {"name": f"{task}.safetensors", "bytes": 123456, "dtype": "float16", "sha256": "ab" * 32,
                     "parameters": 59000},
            "recipe": {"preset": "small", "overrides": ["data.path=/photos/train", "train.rounds=12"], "rounds": 12,
                       "steps": 720, "examples_searched": 384},
            "data": {"description": "126 photos: the training split of the open photo set.", "images": 126,
                     "licences": {"CC-BY-SA-4.0": 100, "CC0-1.0": 26}, "attribution": "docs/photoset.md"},
            "time": {"cpu_seconds": 7200.0, "wall_seconds": 3700.0, "gpu_seconds": None, "gpu": None, "device": "cpu",
                     "threads": 2, "cpu_model": "Some CPU", "cpu_flags": "avx"},
            "heldout": {"baseline": "bicubic", "sets": sets, "protocol": "8 samples per input."},
            "precision": {"change": {"builtin": 0.0003, "photos": -0.0001}, "threshold": 0.002, "stored": "float16",
                          "float32": {"builtin": 0.4997, "photos": best}, "float16": {"builtin": 0.5, "photos": best}},
            "command": "OMP_NUM_THREADS=2 python scripts/train_builtin.py --task super-resolution --install"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny super-resolution model trained for a few steps: its run directory."""
    out = tmp_path_factory.mktemp("trained") / "run"
    training.train(tiny_config("super-resolution", *FAST), out, device="cpu")
    return out


@pytest.fixture
def registry(tmp_path, trained, monkeypatch):
    """A registry folder holding the trained model in float16 with its record, as the package's would."""
    folder = tmp_path / "models"
    generator, config = load_model(trained)
    save_model(folder / "super-resolution.safetensors", generator, config, torch.float16)
    (folder / "super-resolution.json").write_text(json.dumps(record()))
    monkeypatch.setenv(builtin.FOLDER_VARIABLE, str(folder))
    return folder


@pytest.fixture
def photo(tmp_path):
    image = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "small.png"
    save_image(image, path)
    return path


def test_listing_shows_what_the_folder_holds(registry, capsys):
    assert builtin.names() == ["super-resolution"]
    (entry,) = builtin.entries()
    assert entry.name == "builtin:super-resolution" and entry.task == "super-resolution"
    assert entry.dtype == "float16" and entry.parameters == sum(p.numel() for p in Generator(
        tiny_config().model).parameters())
    assert entry.headline["set"] == "photos" and entry.headline["best"] == 0.412
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "builtin:super-resolution" in out and f"{entry.parameters:,d}" in out and " MB " in out
    assert "0.412 = 0.81 x bicubic, diversity 0.234 (51 tiles, photos set)" in out
    assert "colourization" not in out  # absent: not listed


def test_an_empty_registry_lists_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(builtin.FOLDER_VARIABLE, str(tmp_path))
    assert builtin.entries() == [] and main(["models"]) == 0
    assert "no built-in models" in capsys.readouterr().out


def test_load_sample_and_evaluate_by_name(registry, photo, tmp_path, capsys):
    model = chimle.load("builtin:super-resolution")
    assert model.config.task == "super-resolution" and model.path == "builtin:super-resolution"
    assert all(p.dtype == torch.float32 for p in model.generator.parameters())
    assert main(["sample", "--model", "builtin:super-resolution", "--input", str(photo), "-n", "2",
                 "--out", str(tmp_path / "samples")]) == 0
    saved = read_provenance(tmp_path / "samples" / "small_1.png")
    assert saved["model"] == "builtin:super-resolution" and "--model builtin:super-resolution" in saved["command"]
    data = tmp_path / "data"
    for name in ("a", "b"):
        save_image(torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(len(name))), data / f"{name}.png")
    out = tmp_path / "eval" / "report"
    assert main(["evaluate", "--model", "builtin:super-resolution", "--data", str(data), "-n", "2", "--lpips",
                 "alex", "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["methods"]["model"]["lpips_best"] > 0


def test_a_model_not_built_in_is_one_line_error(registry, photo, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="a colourization model is not built into chimle .*built in: "
                                              "builtin:super-resolution"):
        chimle.load("builtin:colourization")
    assert main(["sample", "--model", "builtin:colourization", "--input", str(photo), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not built into" in err
    with pytest.raises(CheckpointError, match="not the name of a built-in model"):
        chimle.load("builtin:../models/super-resolution")


def test_float16_file_renders_like_float32(tmp_path):
    config = tiny_config("super-resolution")
    generator = randomize(Generator(config.model), seed=3)
    save_model(tmp_path / "full.safetensors", generator, config)
    save_model(tmp_path / "half.safetensors", generator, config, torch.float16)
    assert {t.dtype for t in load_file(tmp_path / "half.safetensors").values()} == {torch.float16}
    assert (tmp_path / "half.safetensors").stat().st_size < 0.6 * (tmp_path / "full.safetensors").stat().st_size
    full, half = Model.load(tmp_path / "full.safetensors", "cpu"), Model.load(tmp_path / "half.safetensors", "cpu")
    assert all(p.dtype == torch.float32 for p in half.generator.parameters())
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    a, b = full.sample(image, n=3, seed=2), half.sample(image, n=3, seed=2)
    assert not torch.equal(a, b)  # the weights were rounded ...
    torch.testing.assert_close(b, a, atol=0.02, rtol=0)  # ... and render the same images to rounding


def test_local_paths_are_never_shadowed(registry, trained, tmp_path, monkeypatch):
    config = tiny_config("decompression")
    local = randomize(Generator(config.model), seed=5)
    monkeypatch.chdir(tmp_path)
    for name in ("builtin-super-resolution", "super-resolution", "builtin:super-resolution"):
        save_model(tmp_path / name / "model.safetensors", local, config)
    assert Model.load("builtin-super-resolution").config.task == "decompression"
    assert Model.load("super-resolution").config.task == "decompression"
    assert Model.load("./builtin:super-resolution").config.task == "decompression"
    assert Model.load(tmp_path / "builtin:super-resolution").config.task == "decompression"  # a Path is a path
    with pytest.warns(UserWarning, match="write ./builtin:super-resolution"):
        assert Model.load("builtin:super-resolution").config.task == "super-resolution"  # the exact prefix


def test_serve_without_model_serves_every_builtin(registry, tmp_path, monkeypatch):
    args = build_parser().parse_args(["serve", "--device", "cpu"])
    models = served_models(args)
    assert list(models) == ["builtin-super-resolution"] and models["builtin-super-resolution"].config.task == (
        "super-resolution")
    local = tmp_path / "mine"
    shutil.copytree(registry, local)
    args = build_parser().parse_args(["serve", "--model", str(local / "super-resolution.safetensors"),
                                      "--model", "builtin:super-resolution", "--device", "cpu"])
    assert list(served_models(args)) == ["super-resolution", "builtin-super-resolution"]
    monkeypatch.setenv(builtin.FOLDER_VARIABLE, str(tmp_path / "empty"))
    with pytest.raises(Exception, match="no built-in models to serve: give --model"):
        served_models(build_parser().parse_args(["serve"]))


def first_search_weights(monkeypatch) -> list:
    """Record the generator's weights (and their average's) each time a round's search starts."""
    seen = []
    search = training.search_round

    def recording(config, generator, *args, **kwargs):
        seen.append({k: v.clone() for k, v in generator.state_dict().items()})
        return search(config, generator, *args, **kwargs)

    monkeypatch.setattr(training, "search_round", recording)
    return seen


def test_init_starts_from_the_given_weights(registry, trained, tmp_path, monkeypatch):
    seen = first_search_weights(monkeypatch)
    captured = {}
    restore = training._start_from

    def keep_run(run, weights, source):
        restore(run, weights, source)
        if run.average is not None:
            captured["average"] = {k: v.clone() for k, v in run.average.module.state_dict().items()}

    monkeypatch.setattr(training, "_start_from", keep_run)
    config = tiny_config("super-resolution", *FAST, "train.ema=0.9", "train.seed=7")
    training.train(config, tmp_path / "tuned", device="cpu", init="builtin:super-resolution")
    expected = load_file(registry / "super-resolution.safetensors")
    for state in (seen[0], captured["average"]):
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k].float()) for k in expected)
    assert "started from the weights of builtin:super-resolution" in (tmp_path / "tuned" / "log.txt").read_text()
    # From a run directory: its model file's float32 weights.
    seen.clear()
    training.train(tiny_config("super-resolution", *FAST), tmp_path / "from-run", device="cpu", init=trained)
    assert all(torch.equal(seen[0][k], v) for k, v in load_file(trained / "model.safetensors").items())


def test_a_run_stopped_before_its_first_search_resumes_from_the_init_weights(trained, tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(training, "search_round", stop)
    with pytest.raises(Stop):
        training.train(tiny_config("super-resolution", *FAST), tmp_path / "run", device="cpu", init=trained)
    monkeypatch.undo()
    seen = first_search_weights(monkeypatch)
    training.train(None, tmp_path / "run", resume=True, device="cpu")  # no --init: the step-0 state holds it
    assert all(torch.equal(seen[0][k], v) for k, v in load_file(trained / "model.safetensors").items())


def test_init_with_resume_is_ignored_with_a_message(trained, tmp_path, capsys):
    training.train(tiny_config("super-resolution", *FAST), tmp_path / "run", device="cpu")
    before = load_file(tmp_path / "run" / "model.safetensors")
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--init", str(trained)]) == 0
    assert f"--init {trained} is ignored: the run continues from its own state" in capsys.readouterr().out
    after = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # finished run: nothing changed


def test_init_refuses_another_model_or_task_naming_the_fields(trained, tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"model.blocks=1 \(this run: 2\), model.code_dim=8 \(this run: 4\)"):
        initial_weights(trained, tiny_config("super-resolution", "model.blocks=2", "model.code_dim=4"))
    with pytest.raises(CheckpointError, match="is a super-resolution model, but this run trains decompression"):
        initial_weights(trained, tiny_config("decompression"))
    out = tmp_path / "refused"
    assert main(["train", "--task", "super-resolution", "--preset", "tiny", "-o", "model.blocks=2", "--init",
                 str(trained), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.blocks=1 (this run: 2)" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything was written


def test_package_fits_the_wheel_limit():
    size = builtin.package_size()
    assert 0 < size < builtin.WHEEL_LIMIT, f"the package's files take {size / 2**20:.1f} MiB"
    print(f"package files: {size / 2**20:.2f} MiB, of which assets {builtin.package_size(builtin.PACKAGE / 'assets') / 2**20:.2f} MiB")


def test_card_is_made_from_the_record():
    text = builtin.card(record())
    assert text.startswith("# Built-in model `builtin:super-resolution`")
    assert "do not edit by hand" in text and "| photos | 51 | 0.412 | 0.81 |" in text
    assert "2.00 hours of CPU time" in text and "Some CPU" in text and "CC-BY-SA-4.0 (100)" in text
    assert "scripts/train_builtin.py --task super-resolution --install" in text
    assert "chimle train --init builtin:super-resolution --task super-resolution --preset small --data" in text and "photos -0.00010" in text


def test_init_alone_takes_the_task_of_its_weights(tmp_path):
    config = tiny_config("decompression")
    save_model(tmp_path / "jpeg.safetensors", randomize(Generator(config.model), seed=6), config)
    assert main(["train", "--init", str(tmp_path / "jpeg.safetensors"), "--preset", "tiny", "--out",
                 str(tmp_path / "run"), *[x for o in FAST for x in ("-o", o)]]) == 0
    assert load_model(tmp_path / "run")[1].task == "decompression"


def test_card_shows_the_length_a_run_was_extended_or_shortened_to():
    extended = record()
    extended["recipe"]["overrides"] = ["data.path=PHOTOS", "train.rounds=150", "train.ema=0.999", "train.rounds=40"]
    text = builtin.card(extended)
    assert "`data.path=PHOTOS`, `train.rounds=40`, `train.ema=0.999`" in text and "rounds=150" not in text


def test_card_of_a_fine_tuned_model_says_what_it_started_from():
    tuned = record()
    tuned["init"] = {"model": "builtin:super-resolution", "sha256": "cd" * 32, "record": record(ratio=0.84)}
    tuned["recipe"]["overrides"] = ["data.path=PHOTOS", "train.perceptual=vgg", "train.rounds=16"]
    tuned["time"]["cpu_seconds"] = 1800.0
    text = builtin.card(tuned)
    assert "Fine-tuned from `builtin:super-resolution` (sha256 `cdcdcdcdcdcdcdcd…`)" in text
    assert "photos best-of-8 / baseline 0.840" in text and "2.00 hours of CPU time" in text
    assert "Both stages together took 2.50 hours of CPU time" in text and "`train.perceptual=vgg`" in text
    assert "Fine-tuned" not in builtin.card(record())


def test_card_of_a_model_fine_tuned_twice_names_every_stage_and_adds_up_their_time():
    first = record(ratio=0.84)  # 2 hours
    second = record(ratio=0.81)
    second["init"] = {"model": "builtin:super-resolution", "sha256": "ab" * 32, "record": first}
    second["recipe"]["overrides"] = ["data.path=PHOTOS", "train.perceptual=vgg", "train.rounds=12"]
    second["time"]["cpu_seconds"] = 3600.0
    third = record(ratio=0.80)
    third["init"] = {"model": "builtin:super-resolution", "sha256": "cd" * 32, "record": second}
    third["recipe"]["overrides"] = ["data.path=PHOTOS", "train.pixel_weight=0.3", "train.rounds=12"]
    third["time"]["cpu_seconds"] = 1800.0
    text = builtin.card(third)
    assert "photos best-of-8 / baseline 0.840" in text and "photos best-of-8 / baseline 0.810" in text
    assert "`abababababababab…`" in text and "`cdcdcdcdcdcdcdcd…`" in text
    assert text.index("0.840") < text.index("0.810") < text.index("`train.pixel_weight=0.3`")  # earliest first
    assert "All 3 stages together took 3.50 hours of CPU time" in text


def test_fine_tuning_takes_the_model_settings_the_command_line_leaves_at_the_presets(tmp_path, capsys):
    """A built-in model trained before its preset changed (super-resolution before `small` took up
    model.predict_residual) could no longer be fine-tuned by the README's command: every differing field was refused."""
    config = tiny_config("super-resolution", "model.predict_residual=true", "model.code_dim=6")
    save_model(tmp_path / "sr.safetensors", randomize(Generator(config.model), seed=4), config)
    assert main(["train", "--init", str(tmp_path / "sr.safetensors"), "--preset", "tiny", "--out",
                 str(tmp_path / "run"), *[x for o in FAST for x in ("-o", o)]]) == 0
    assert (f"taking the model settings of {tmp_path / 'sr.safetensors'} that differ from the preset's: "
            "model.code_dim=6 model.predict_residual=true") in capsys.readouterr().out
    model = load_model(tmp_path / "run")[1].model
    assert model.predict_residual and model.code_dim == 6
    # What the command line gives stays, and is refused where the weights differ.
    assert main(["train", "--init", str(tmp_path / "sr.safetensors"), "--preset", "tiny", "-o", "model.code_dim=5",
                 "--out", str(tmp_path / "refused")]) == 2
    assert "model.code_dim=6 (this run: 5)" in capsys.readouterr().err and not (tmp_path / "refused").exists()
