import numpy as np
import pytest
import torch
from PIL import Image

import chimle
from chimle.checkpoint import save_model
from chimle.cli import main
from chimle.config import ConfigError
from chimle.generator import Generator
from chimle.sample import Model, parse_sources, read_provenance
from conftest import randomize, tiny_config


@pytest.fixture
def model_path(tmp_path):
    config = tiny_config("super-resolution")
    save_model(tmp_path / "run" / "model.safetensors", randomize(Generator(config.model), seed=4), config)
    return tmp_path / "run"


@pytest.fixture
def photo(tmp_path):
    array = torch.rand(7, 6, 3, generator=torch.Generator().manual_seed(0)).mul(255).round().byte().numpy()
    Image.fromarray(array).save(tmp_path / "small.png")
    return tmp_path / "small.png"


def test_readme_example(model_path, photo):
    model = chimle.load(model_path)                          # run directory or model.safetensors
    samples = model.sample(photo, n=8, seed=0)               # (8, 3, 4H, 4W) in [0, 1] for this 2-level model
    details = model.vary(photo, seed=1, keep_levels=1, n=4, index=3)       # coarse level of sample 3 kept
    structure = model.vary(photo, seed=1, keep_levels=[1], n=4, index=3)   # fine level of sample 3 kept
    assert isinstance(model, Model) and model.device.type == "cpu"
    assert samples.shape == (8, 3, 28, 24) and details.shape == structure.shape == (4, 3, 28, 24)
    assert 0 <= samples.min() and samples.max() <= 1


def test_inputs_as_path_pil_or_tensor_give_the_same_samples(model_path, photo):
    model = chimle.load(model_path, device="cpu")
    from_path = model.sample(photo, n=2, seed=5)
    from_pil = model.sample(Image.open(photo), n=2, seed=5)
    tensor = torch.from_numpy(np.asarray(Image.open(photo)).copy()).permute(2, 0, 1) / 255
    from_tensor = model.sample(tensor, n=2, seed=5)
    assert torch.equal(from_path, from_pil) and torch.equal(from_path, from_tensor)
    assert not torch.equal(from_path[0], from_path[1])


def test_vary_keeps_the_named_levels_of_its_base(model_path, photo):
    model = chimle.load(model_path, device="cpu")
    originals = model.sample(photo, n=4, seed=9)
    details = model.vary(photo, seed=9, keep_levels=1, n=4, index=2)
    assert torch.equal(details[2], originals[2])  # variation `index` of its own seed is the sample itself
    assert torch.equal(details[1], model.render(photo, [[(9, 2), (9, 1)]])[0])
    structure = model.vary(photo, seed=4, keep_levels=[1], n=3, index=2, base=[(9, 2), (9, 2)])
    assert torch.equal(structure[0], model.render(photo, [[(4, 0), (9, 2)]])[0])
    # Sources after two rounds: coarse from one round, fine from another.
    mixed = model.vary(photo, seed=7, keep_levels=[0], n=2, base=[(4, 1), (9, 2)])
    assert torch.equal(mixed[1], model.render(photo, [[(4, 1), (7, 1)]])[0])
    assert not torch.equal(mixed[0], mixed[1])
    with pytest.raises(ValueError, match="0..1"):
        model.vary(photo, seed=0, keep_levels=[2])


def test_sources_text_is_checked():
    assert parse_sources("3:1, 8:0", 2) == [(3, 1), (8, 0)]
    with pytest.raises(ConfigError, match="the model has 3"):
        parse_sources("3:1,8:0", 3)
    with pytest.raises(ConfigError, match="e.g. 3:1,3:1"):
        parse_sources("3-1,8", 2)


def test_sources_option_renders_exactly_a_saved_sample(model_path, photo, tmp_path, capsys):
    """Every sample records its sources; `--sources` (text or the PNG itself) renders the same pixels."""
    base = ["sample", "--model", str(model_path), "--input", str(photo)]
    assert main([*base, "-n", "3", "--seed", "2", "--keep-levels", "1", "--from-seed", "1",
                 "--out", str(tmp_path / "a")]) == 0
    saved = tmp_path / "a" / "small_2.png"
    record = read_provenance(saved)
    assert record["sources"] == "2:1,2:2" and record["input"] == "small.png" and record["levels"] == 2
    assert main([*base, "--sources", "2:1,2:2", "--out", str(tmp_path / "b")]) == 0
    assert main([*base, "--sources", str(saved), "--out", str(tmp_path / "c")]) == 0
    for folder in ("b", "c"):
        again = Image.open(tmp_path / folder / "small_2-1_2-2.png")
        assert again.tobytes() == Image.open(saved).tobytes()
    assert main([*base, "--sources", "2:1", "--out", str(tmp_path / "d")]) == 2
    assert "name 1 level(s); the model has 2" in capsys.readouterr().err
