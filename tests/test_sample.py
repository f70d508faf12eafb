import pytest
import torch
from PIL import Image

from chimle import files
from chimle.blocks import WNConv2d
from chimle.checkpoint import load_model, save_model
from chimle.cli import main
from chimle.convert import convert_file
from chimle.data import save_image
from chimle.report import write_report
from chimle.generator import Generator
from chimle.sample import Model, codes_from_sources, image_grid, save_sample
from conftest import randomize, tiny_config
from test_convert import official_state


def model_file(tmp_path):
    config = tiny_config("super-resolution")
    generator = randomize(Generator(config.model), seed=4)
    save_model(tmp_path / "model.safetensors", generator, config)
    return tmp_path / "model.safetensors"


def test_keep_levels_fixes_coarse_codes_and_varies_fine_ones(tmp_path):
    model = Model.load(model_file(tmp_path), device="cpu")
    image = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    originals = model.sample(image, n=4, seed=9)
    assert all((originals[0] - o).abs().max() > 1e-3 for o in originals[1:])
    same = model.sample(image, n=3, seed=9, keep_levels=model.levels, from_index=2)
    for s in same:  # batched rendering may differ in the last float bits
        torch.testing.assert_close(s, originals[2], atol=1e-5, rtol=1e-5)
    varied = model.vary(image, seed=9, index=2, keep_levels=1, n=4)
    torch.testing.assert_close(varied[2], originals[2])  # its own fine codes: the original again
    assert (varied[0] - originals[0]).abs().max() > 1e-3 and (varied[0] - originals[2]).abs().max() > 1e-3


def test_sample_command_writes_samples_and_grids(tmp_path, capsys):
    path = model_file(tmp_path)
    (tmp_path / "in").mkdir()
    Image.new("RGB", (5, 7), (200, 30, 40)).save(tmp_path / "in" / "a.png")
    Image.new("RGB", (20, 28), (200, 30, 40)).save(tmp_path / "gt.png")
    code = main(["sample", "--model", str(path), "--input", str(tmp_path / "in"), "-n", "3", "--seed", "1",
                 "--out", str(tmp_path / "out"), "--target", str(tmp_path / "gt.png")])
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["a_0.png", "a_1.png", "a_2.png", "a_grid.png"]
    assert Image.open(tmp_path / "out" / "a_0.png").size == (20, 28)  # x4 with the tiny preset's 2 levels
    again = Model.load(path, device="cpu").sample(torch.ones(3, 7, 5), n=1, seed=1)
    assert again.shape == (1, 3, 28, 20)
    code = main(["sample", "--model", str(path), "--input", str(tmp_path / "in"), "--keep-levels", "5",
                 "--out", str(tmp_path / "out2")])
    assert code == 2 and "the model has 2 levels" in capsys.readouterr().err


def test_a_model_renders_with_its_weights_prepared_once_and_returns_ordinary_tensors(tmp_path):
    """Model folds weight normalisation and keeps channels-last weights (the search's fixed_weights, the measured
    fast path), and renders in inference mode; the pixels are those of the plain forward up to float rounding."""
    path = model_file(tmp_path)
    model = Model.load(path, device="cpu")
    convs = [m for m in model.generator.modules() if isinstance(m, WNConv2d)]
    assert all(c._folded is not None and c._folded.is_contiguous(memory_format=torch.channels_last) for c in convs)
    image = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(1))
    samples = model.sample(image, n=2, seed=3)
    assert not samples.is_inference()
    samples.clamp_(0, 1)  # an ordinary tensor: in-place changes are allowed
    plain, config = load_model(path)
    inputs = model.inputs(image)
    codes = codes_from_sources(plain.code_sizes(plain.start(inputs)), [(3, 1), (3, 1)])
    with torch.no_grad():
        expected = model.task.image(plain(inputs, codes)[-1], inputs, config.model.levels - 1)[0]
    torch.testing.assert_close(samples[1], expected, atol=2e-5, rtol=0)


class Crash(Exception):
    pass


def test_samples_grids_reports_and_converted_configs_are_written_atomically(tmp_path, monkeypatch):
    """Killed while writing (here: an exception at the crash point between writing and renaming), each leaves no
    file, or the previous one, and no temporary file."""
    def crash(name):
        if name.startswith("write:"):
            raise Crash(name)

    monkeypatch.setattr(files, "crash_point", crash)
    image = torch.rand(3, 4, 4)
    writes = [lambda: save_sample(image, tmp_path / "s.png", {}), lambda: save_image(image, tmp_path / "g.png"),
              lambda: image_grid([[image, image]], tmp_path / "grid.png"),
              lambda: write_report({"warnings": []}, tmp_path / "report")]
    for write in writes:
        with pytest.raises(Crash):
            write()
    cfg, state = official_state("super-resolution")
    torch.save(state, tmp_path / "official.pth")
    monkeypatch.setattr(files, "crash_point", lambda name: crash(name) if name == "write:config.yaml" else None)
    with pytest.raises(Crash):
        convert_file(tmp_path / "official.pth", "super-resolution", tmp_path / "converted")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["model.safetensors", "official.pth"]
