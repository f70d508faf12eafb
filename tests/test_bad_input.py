"""Bad input: every case stops with a message naming what was wrong (or, where the README says so, is skipped
with --skip-bad), and loses nothing."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import chimle.train as train_module
from chimle.checkpoint import CheckpointError, load_model, load_state, save_model
from chimle.cli import main
from chimle.config import ConfigError, resolve
from chimle.data import DataError, ImageFolder, load_image
from chimle.generator import Generator
from chimle.train import train
from conftest import tiny_config


def photo(h=40, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path, array, **kwargs):
    Image.fromarray(array).save(path, **kwargs)
    return path


def raw_png(path, width, height, bit_depth, colour_type, rows: bytes):
    """A PNG written by hand: any header (even one promising a huge image), then the given scanlines."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.fromarray(photo(64, 64)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


# Formats that are fine: converted to 8-bit RGB in [0, 1] with the right values -------------------------------


def test_sixteen_bit_png(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3) * 1000
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)
    image = load_image(raw_png(tmp_path / "rgb16.png", 5, 4, 16, 2, rows))  # 48-bit colour
    torch.testing.assert_close(image, torch.from_numpy(rgb / 65535).permute(2, 0, 1).float(), atol=1 / 255, rtol=0)
    grey = np.linspace(0, 65535, 20).astype(np.uint16).reshape(4, 5)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    image = load_image(tmp_path / "grey16.png")
    assert image.shape == (3, 4, 5) and torch.equal(image[0], image[2])
    torch.testing.assert_close(image[1], torch.from_numpy(grey / 65535).float(), atol=0.5 / 255, rtol=0)


def test_cmyk_jpeg_palette_png_and_alpha_give_the_colours_shown(tmp_path):
    patches = np.zeros((16, 48, 3), dtype=np.uint8)
    patches[:, :16] = (255, 0, 0)
    patches[:, 16:32] = (0, 255, 0)
    patches[:, 32:] = (40, 80, 200)
    Image.fromarray(patches).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    expected = torch.from_numpy(patches).permute(2, 0, 1).float() / 255
    cmyk = load_image(tmp_path / "cmyk.jpg")
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert (cmyk[:, 4:-4, 4:12] - expected[:, 4:-4, 4:12]).abs().max() < 0.05  # JPEG is lossy
    assert (cmyk[:, 4:-4, 36:44] - expected[:, 4:-4, 36:44]).abs().max() < 0.05

    Image.fromarray(patches).convert("P", palette=Image.Palette.ADAPTIVE, colors=3).save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    assert torch.equal(load_image(tmp_path / "palette.png"), expected)

    rgba = np.dstack([patches, np.full((16, 48), 128, dtype=np.uint8)])  # half transparent, shown on white
    half = load_image(save(tmp_path / "rgba.png", rgba))
    torch.testing.assert_close(half, expected * 128 / 255 + 127 / 255, atol=1 / 255, rtol=0)


def test_exif_orientation_is_applied_to_pixels_and_size_checks(tmp_path):
    stored = photo(40, 20)  # 20 px wide, 40 px high as stored; shown rotated 90 degrees clockwise: 40 x 20
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    (tmp_path / "rotated").mkdir()
    image.save(tmp_path / "rotated" / "r.png", exif=exif)
    loaded = load_image(tmp_path / "rotated" / "r.png")
    assert torch.equal(loaded, torch.from_numpy(np.rot90(stored, k=-1).copy()).permute(2, 0, 1).float() / 255)
    # A 16 x 32 (height x width) crop fits the image as shown, not as stored.
    assert len(ImageFolder(tmp_path / "rotated", (16, 32))) == 1
    (tmp_path / "plain").mkdir()
    save(tmp_path / "plain" / "p.png", stored)
    with pytest.raises(DataError, match="p.png: 20x40 px is smaller than the 32x16 px crop"):
        ImageFolder(tmp_path / "plain", (16, 32))


# Unusable files: refused, all of them named at once, or skipped with --skip-bad --------------------------------


def test_unusable_files_are_listed_together_or_skipped(tmp_path):
    save(tmp_path / "good.png", photo())
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is not an image")
    save(tmp_path / "small.png", photo(20, 48))
    with pytest.raises(DataError) as error:
        ImageFolder(tmp_path, 32)
    message = str(error.value)
    assert "3 unusable training image(s)" in message and "--skip-bad" in message
    assert "empty.jpg: empty file" in message
    assert "notes.png: not a readable image" in message
    assert "small.png: 48x20 px is smaller than the 32x32 px crop" in message
    with pytest.warns(UserWarning) as caught:
        folder = ImageFolder(tmp_path, 32, skip_bad=True)
    assert sum("skipping" in str(w.message) for w in caught) == 3
    assert [p.name for p in folder.files] == ["good.png"]


def test_truncated_jpeg_stops_at_first_read_or_is_replaced(tmp_path):
    """Its header looks fine, so it is found when first decoded: an error (the run's checkpoints are intact), or
    with --skip-bad a warning and, every time, the next file of the pass order in its place."""
    name, message = "cut.jpg", "cut.jpg: the image could not be decoded .*; it may be truncated"
    truncated_jpeg(tmp_path / name)
    for i in range(2):
        save(tmp_path / f"good{i}.png", photo(seed=i))
    folder = ImageFolder(tmp_path, 32)
    with pytest.raises(DataError, match=message):
        for number in range(3):
            folder.example(0, number)
    with pytest.warns(UserWarning, match=f"skipping .*{message}"):
        examples = [ImageFolder(tmp_path, 32, skip_bad=True).example(0, n) for n in range(3)]
    assert {e.file.name for e in examples} == {"good0.png", "good1.png"}
    again = ImageFolder(tmp_path, 32, skip_bad=True)
    with pytest.warns(UserWarning):
        assert all(torch.equal(e.image, again.example(0, n).image) for n, e in enumerate(examples))


@pytest.mark.parametrize("side", [10_000, 20_000])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    # 100 or 400 million pixels promised by a 60-byte file: refused from the header, nothing allocated.
    with pytest.raises(DataError, match="huge.png: the image is implausibly large .*downscale it first"):
        load_image(raw_png(tmp_path / "huge.png", side, side, 8, 0, b"\x00"))


def test_cli_refuses_a_bad_folder_without_writing_or_trains_with_skip_bad(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        save(data / f"good{i}.png", photo(seed=i))
    (data / "empty.png").write_bytes(b"")
    (data / "page.jpg").write_text("<html>not found</html>")
    command = ["train", "--preset", "tiny", "--data", str(data), "-o", "train.rounds=1", "-o", "train.round_size=2",
               "-o", "train.steps_per_round=1"]
    assert main([*command, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "empty.png" in err and "page.jpg" in err and "--skip-bad" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    with pytest.warns(UserWarning, match="skipping"):
        assert main([*command, "--out", str(tmp_path / "run"), "--skip-bad"]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


# Settings, weights and checkpoints -------------------------------------------------------------------------


def test_out_of_range_settings_are_all_listed_and_nothing_is_written(tmp_path, capsys):
    bad = ["train.lr=-1", "data.crop=30", "train.batch_size=0", "train.beta1=1.5", "search.samples_per_level=[4]"]
    code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), *[f"-o{o}" for o in bad]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    for text in ("train.lr must be > 0", "data.crop=30 must be a positive multiple", "train.batch_size=0 must be >= 1",
                 "beta1 and beta2 in [0, 1)", "search.samples_per_level=[4] needs one positive value per level"):
        assert text in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="train.lr must be > 0"):
        resolve(task="super-resolution", preset="tiny", overrides=["train.lr=.nan"])


def test_missing_weights_stop_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHIMLE_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "lpips-alex weights not found" in err and "chimle weights fetch" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_model_files_of_another_size_foreign_or_truncated_are_named(tmp_path):
    config = tiny_config()
    save_model(tmp_path / "good.safetensors", Generator(config.model), config)
    assert load_model(tmp_path / "good.safetensors")[1] == config

    bigger = Generator(tiny_config("super-resolution", "model.channels=[12,12]").model)
    metadata = {"format": "chimle-generator/1", "config": config.to_yaml()}
    save_file({k: v.contiguous() for k, v in bigger.state_dict().items()}, str(tmp_path / "other.safetensors"),
              metadata)
    with pytest.raises(CheckpointError, match="other.safetensors does not fit the model:\n  shape of levels"):
        load_model(tmp_path / "other.safetensors")

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="foreign.safetensors is not a chimle model"):
        load_model(tmp_path / "foreign.safetensors")

    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors .*truncated"):
        load_model(tmp_path / "cut.safetensors")


# Non-finite losses -------------------------------------------------------------------------------------------

STEPS = ["train.rounds=1", "train.round_size=4", "train.steps_per_round=4", "train.grid_every=100"]


def test_non_finite_losses_skip_their_step_then_stop_the_run(tmp_path, monkeypatch):
    real = train_module.level_losses
    calls = []

    def nan_at(*bad):
        def losses(*args, **kwargs):
            calls.append(1)
            value = real(*args, **kwargs)
            return value * float("nan") if len(calls) in bad else value
        return losses

    # Two bad steps of four: skipped with a warning, Adam takes the other two.
    monkeypatch.setattr(train_module, "level_losses", nan_at(2, 3))
    with pytest.warns(UserWarning, match=r"step 1: non-finite loss \(nan\); the step is skipped"):
        train(tiny_config("super-resolution", *STEPS), tmp_path / "some")
    state = load_state(sorted((tmp_path / "some").glob("state-*.pt"))[-1])
    assert state["step"] == 4 and {float(s["step"]) for s in state["optimizer"]["state"].values()} == {2.0}

    # Nothing but bad steps: the run stops after five, saying what to do; its checkpoint is intact.
    calls.clear()
    monkeypatch.setattr(train_module, "level_losses", nan_at(*range(1, 100)))
    run = tmp_path / "bad"
    with pytest.raises(FloatingPointError, match=r"5 non-finite losses in a row at step 4; training stopped\. Its last "
                                                 r"checkpoint is intact: lower train.lr in .*config.yaml and continue "
                                                 r"with --resume"), pytest.warns(UserWarning):
        train(tiny_config("super-resolution", *STEPS, "train.steps_per_round=8"), run)
    assert load_state(run / "state-000000004.pt")["step"] == 4

    # Doing what the message says works: the resumed run trains at the lower rate.
    monkeypatch.setattr(train_module, "level_losses", real)
    settings = yaml.safe_load((run / "config.yaml").read_text())
    settings["train"]["lr"] = 1e-4
    (run / "config.yaml").write_text(yaml.safe_dump(settings))
    train(tiny_config("super-resolution", *STEPS), run, resume=True)
    final = load_state(run / "state-000000008.pt")
    assert [g["lr"] for g in final["optimizer"]["param_groups"]] == [1e-4, 1e-4 * 0.01]


@pytest.mark.parametrize("side", [10_000, 20_000])
def test_decompression_bomb_in_a_training_folder_is_listed_from_its_header(tmp_path, side):
    save(tmp_path / "good.png", photo())
    raw_png(tmp_path / "huge.png", side, side, 8, 0, b"\x00")
    with pytest.raises(DataError, match="huge.png: the image is implausibly large"):
        ImageFolder(tmp_path, crop=32)
    with pytest.warns(UserWarning, match="huge.png"):
        assert [p.name for p in ImageFolder(tmp_path, crop=32, skip_bad=True).files] == ["good.png"]


def test_greyscale_images_are_refused_for_colourization(tmp_path):
    save(tmp_path / "colour.png", photo())
    Image.fromarray(photo()[..., 0]).save(tmp_path / "grey_mode.png")  # an L-mode file: found from its header
    grey_rgb = np.repeat(photo(seed=3)[..., :1], 3, axis=2)
    save(tmp_path / "grey_rgb.png", grey_rgb)  # RGB with equal channels: found when read
    with pytest.raises(DataError, match="grey_mode.png: greyscale image; the colourization task"):
        ImageFolder(tmp_path, crop=32, colour=True)
    folder = ImageFolder(tmp_path, crop=32, colour=True, skip_bad=True)
    assert "grey_mode.png" not in [p.name for p in folder.files]
    with pytest.warns(UserWarning, match="grey_rgb.png: greyscale image"):
        stems = {folder.example(0, n).file.stem for n in range(6)}
    assert stems == {"colour"}
    strict = ImageFolder(tmp_path / "colour.png", crop=32, colour=True)  # one colour file is fine
    assert strict.example(0, 0).image.shape == (3, 32, 32)


def test_a_dark_sixteen_bit_image_is_not_read_as_an_eight_bit_one(tmp_path):
    """Pillow reads 16-bit PGM (and some 16-bit PNG and TIFF) as mode I: its values are 16-bit whatever their
    largest, so a dark image, all of whose values are at most 255, stays dark."""
    values = np.array([[0, 100, 200, 255]], dtype=">u2")
    (tmp_path / "dark.pgm").write_bytes(b"P5\n4 1\n65535\n" + values.tobytes())
    assert Image.open(tmp_path / "dark.pgm").mode == "I"
    image = load_image(tmp_path / "dark.pgm")
    torch.testing.assert_close(image[0, 0], torch.from_numpy(values[0] / 65535).float(), atol=0.5 / 255, rtol=0)


@pytest.mark.parametrize("setting", ["train.compile", "search.compile"])
def test_compile_without_a_cpp_compiler_is_refused_before_the_run_is_made(tmp_path, monkeypatch, setting):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(train_module.shutil, "which", lambda name: None)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"{setting}=true: torch.compile needs a C\+\+ compiler .* install one "
                                          rf"\(e.g. apt install g\+\+\) or set {setting}=false"):
        train(tiny_config("super-resolution", f"{setting}=true"), out)
    assert not out.exists() or not any(out.iterdir())
    monkeypatch.setenv("CXX", "my-g++")
    seen = []
    monkeypatch.setattr(train_module.shutil, "which", lambda name: seen.append(name))
    assert train_module.c_compiler() is None and seen == ["my-g++"]
