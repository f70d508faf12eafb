import torch
from PIL import Image

from chimle.checkpoint import save_model
from chimle.cli import main
from chimle.generator import Generator
from chimle.sample import Model
from conftest import randomize, tiny_config


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
