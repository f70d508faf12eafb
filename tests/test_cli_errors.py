"""The command line under bad input: one line that says what was wrong and what to do, never a traceback, and
nothing written; every bad input of a folder listed before anything is rendered."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import chimle.sample
from chimle import files
from chimle.checkpoint import save_model
from chimle.cli import build_parser, main
from chimle.generator import Generator
from conftest import randomize, tiny_config


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny 4x super-resolution model."""
    config = tiny_config("super-resolution")
    run = tmp_path_factory.mktemp("model")
    save_model(run / "model.safetensors", randomize(Generator(config.model), seed=1), config)
    return str(run)


def image(path, width, height, seed=0):
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return str(path)


def fails(capsys, *argv) -> str:
    """Run the command, which must fail with exit code 2 and no traceback; its error output."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") >= 1, err
    return err


def test_out_that_is_a_file_lies_under_one_or_cannot_be_written(model, tmp_path, capsys, monkeypatch):
    photo, file = image(tmp_path / "in.png", 4, 4), tmp_path / "file"
    file.write_text("not a folder")
    commands = [["sample", "--model", model, "--input", photo, "--out"],
                ["train", "--preset", "tiny", "-o", "train.rounds=1", "--out"],
                ["evaluate", "--model", model, "--lpips", "alex", "--out"]]
    for command in commands:
        assert "is a file; give a folder" in fails(capsys, *command, file if command[0] != "evaluate" else file / "r")
        assert f"lies under {file}, which is a file" in fails(capsys, *command, file / "sub" / "r")
    monkeypatch.setattr(files.os, "access", lambda path, mode: False)  # as for a folder of another user
    for command in commands:
        assert "(permission denied); give a folder you can write to" in fails(capsys, *command, tmp_path / "out" / "r")
    assert not (tmp_path / "out").exists()


def test_a_write_that_fails_is_one_line(model, tmp_path, capsys, monkeypatch):
    def refuse(fd, content):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files, "_write_all", refuse)
    photo = image(tmp_path / "in.png", 4, 4)
    err = fails(capsys, "sample", "--model", model, "--input", photo, "--out", tmp_path / "o")
    assert "could not write" in err and "in_0.png: Permission denied" in err


def test_every_bad_input_is_listed_before_anything_is_rendered(model, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image(inputs / "a_good.png", 4, 4)
    image(inputs / "dot.png", 1, 1)
    image(inputs / "big.png", 64, 64)
    (inputs / "empty.png").write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buffer, format="JPEG")
    (inputs / "cut.jpg").write_bytes(buffer.getvalue()[:200])
    err = fails(capsys, "sample", "--model", model, "--input", inputs, "--out", tmp_path / "out",
                "--max-output-pixels", 10_000)
    assert "4 input(s) cannot be sampled (nothing was rendered)" in err
    assert "dot.png: an input of 1x1 px is too small for this model: it needs sides of at least 2 px" in err
    assert ("big.png: 64x64 px gives a 256x256 px output, more than --max-output-pixels 10,000: downscale it, or "
            "render it in tiles (--tile PX) with a larger --max-output-pixels") in err
    assert "empty.png: the file is empty" in err and "cut.jpg: the image could not be decoded" in err
    assert "--skip-bad" not in err  # an option of training only
    assert not (tmp_path / "out").exists()


def test_outputs_are_limited_by_default_and_tiles_render_larger_ones(model, tmp_path, capsys):
    assert build_parser().parse_args(["sample", "--model", "m", "--input", "i", "--out", "o"]).max_output_pixels \
        == 2048 * 2048
    small_file = tmp_path / "plain.png"
    Image.new("RGB", (2000, 2000), (90, 90, 90)).save(small_file, optimize=True)
    assert small_file.stat().st_size < 20_000  # a few kilobytes that decode to 2000 x 2000 px, 8000 x 8000 out
    err = fails(capsys, "sample", "--model", model, "--input", small_file, "--out", tmp_path / "no")
    assert "gives a 8000x8000 px output, more than --max-output-pixels 4,194,304" in err
    big = image(tmp_path / "big.png", 24, 24)
    fails(capsys, "sample", "--model", model, "--input", big, "--out", tmp_path / "no", "--max-output-pixels", 9000)
    assert main(["sample", "--model", model, "--input", big, "--out", str(tmp_path / "tiled"), "-n", "2",
                 "--tile", "8", "--overlap", "4", "--max-output-pixels", "10000"]) == 0
    assert Image.open(tmp_path / "tiled" / "big_1.png").size == (96, 96)


def test_seeds_and_devices_out_of_range(model, tmp_path, capsys):
    photo, out = image(tmp_path / "in.png", 4, 4), tmp_path / "out"
    sample = ["sample", "--model", model, "--input", photo, "--out", out]
    assert "below 10**18" in fails(capsys, *sample, "--sources", "9" * 5000 + ":1,1:1")
    assert "'tpu' is not a device name: give cpu, cuda, cuda:N or mps" in fails(capsys, *sample, "--device", "tpu")
    assert "is not a device name" in fails(capsys, "train", "--preset", "tiny", "--device", "tpu", "--out", out)
    if not torch.cuda.is_available():
        assert "'cuda' is not available here" in fails(capsys, *sample, "--device", "cuda")
    assert not out.exists()


def test_evaluate_names_the_image_too_small_for_the_crop(model, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    small = image(data / "small.png", 32, 32)
    err = fails(capsys, "evaluate", "--model", model, "--data", data, "--crop", 128, "--lpips", "alex", "-n", 1,
                "--out", tmp_path / "report")
    assert f"{small}: an image of 32x32 px is smaller than the 128 px crop" in err
    (data / "small.png").write_bytes(b"")
    err = fails(capsys, "evaluate", "--model", model, "--data", data, "--lpips", "alex", "-n", 1,
                "--out", tmp_path / "report")
    assert "small.png: the file is empty" in err and "--skip-bad" not in err  # an option of training only


def test_an_internal_file_not_found_keeps_its_traceback(model, tmp_path, monkeypatch):
    """A missing file the user named is a one-line error; one the code looks for by mistake is a bug to report."""
    def broken(args):
        open(os.path.join(tmp_path, "no", "such", "file"))

    monkeypatch.setattr(chimle.sample, "sample_command", broken)
    with pytest.raises(FileNotFoundError):
        main(["sample", "--model", model, "--input", "x.png", "--out", str(tmp_path / "o")])
