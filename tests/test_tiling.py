import numpy as np
import pytest
import torch
from PIL import Image

from chimle.checkpoint import save_model
from chimle.cli import main
from chimle.config import ConfigError
from chimle.generator import Generator
from chimle.sample import Model, codes_from_sources, read_provenance, variations
from chimle.tasks import TaskError
from chimle.tiling import Tiling, owned, ramp, render_tiled, starts
from conftest import randomize, tiny_config


def tiny_model(task: str) -> Model:
    config = tiny_config(task)
    return Model(randomize(Generator(config.model), seed=4), config, "cpu")


def smooth_image(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth random image (noise upsampled), closer to a photo than white noise."""
    coarse = torch.rand(1, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0]


def test_tiles_cover_the_side_and_ramps_add_up_to_one():
    assert starts(40, 16, 4) == [0, 12, 24]
    assert starts(16, 16, 4) == [0] and starts(10, 16, 4) == [0]
    parts = owned(starts(40, 16, 4), 40, 16)
    assert parts[0][0] == 0 and parts[-1][1] == 40
    assert all(a[1] == b[0] for a, b in zip(parts[:-1], parts[1:]))  # disjoint and contiguous
    falling, rising = ramp(16, 0, 6), ramp(16, 6, 0)
    torch.testing.assert_close(falling[-6:] + rising[:6], torch.ones(6))
    assert falling[:10].eq(1).all() and (ramp(16, 6, 6) > 0).all()


def test_one_tile_over_the_whole_input_is_the_untiled_render():
    """Windowing the codes and inputs of a single tile gives back the untiled ones exactly."""
    for task, size in (("super-resolution", 10), ("decompression", 12)):
        model = tiny_model(task)
        image = smooth_image(size)
        untiled = model.render(image, [[(3, 1)] * model.levels])
        inputs = model.inputs(image)
        codes = codes_from_sources(model.generator.code_sizes(model.generator.start(inputs)), [(3, 1)] * model.levels)
        tiled = render_tiled(model.generator, model.task, inputs, codes, Tiling(64, 0, "tile"), (size, size))
        with_stats = render_tiled(model.generator, model.task, inputs, codes, Tiling(64, 0), (size, size))
        assert torch.equal(tiled, untiled)
        torch.testing.assert_close(with_stats, untiled, atol=1e-5, rtol=0)  # the same norm, computed by hand


@pytest.mark.parametrize("task,size", [("super-resolution", 24), ("decompression", 48)])
def test_tiled_render_agrees_with_the_untiled_one(task, size):
    """With whole-image instance-norm statistics and an overlap, tiles reproduce the untiled render to well
    within 2% of the difference between two samples (a wrong noise window gives a different sample); with
    per-tile statistics the difference is larger, which is why whole-image statistics are the default."""
    model = tiny_model(task)
    image = smooth_image(size)
    sources = variations([(0, 0)] * model.levels, set(), 0, 2)
    untiled = model.render(image, sources)
    between_samples = (untiled[0] - untiled[1]).abs().mean()
    errors = {}
    for stats in ("image", "tile"):
        model.tiling = Tiling(size // 2, 8, stats)
        tiled = model.render(image, sources[:1])[0]
        assert tiled.shape == untiled[0].shape
        errors[stats] = (tiled - untiled[0]).abs()
    assert errors["image"].mean() < 0.02 * between_samples
    assert errors["image"].max() < 0.02
    assert errors["tile"].mean() > 2 * errors["image"].mean()


def test_tiles_must_fit_the_coarsest_level():
    model = tiny_model("decompression")  # 2 levels: the coarse level sees the input at half size
    model.tiling = Tiling(15, 4)
    with pytest.raises(TaskError, match="multiples of 2 px"):
        model.render(smooth_image(32), [[(0, 0), (0, 0)]])
    with pytest.raises(ConfigError, match="less than the tile side"):
        Tiling(8, 8)


def test_sample_command_tiles_and_records_the_tiling(tmp_path):
    config = tiny_config("super-resolution")
    save_model(tmp_path / "model.safetensors", randomize(Generator(config.model), seed=4), config)
    array = (smooth_image(20).permute(1, 2, 0) * 255).round().byte().numpy()
    Image.fromarray(array).save(tmp_path / "in.png")
    base = ["sample", "--model", str(tmp_path / "model.safetensors"), "--input", str(tmp_path / "in.png")]
    assert main([*base, "-n", "2", "--seed", "3", "--tile", "8", "--overlap", "4", "--out", str(tmp_path / "a")]) == 0
    record = read_provenance(tmp_path / "a" / "in_1.png")
    assert record["sources"] == "3:1,3:1" and record["tile"] == [8, 4, "image"]
    assert "--tile 8 --overlap 4 --tile-stats image" in record["command"]
    assert main([*base, "--sources", str(tmp_path / "a" / "in_1.png"), "--tile", "8", "--overlap", "4",
                 "--out", str(tmp_path / "b")]) == 0
    again = Image.open(tmp_path / "b" / "in_3-1_3-1.png")
    assert again.tobytes() == Image.open(tmp_path / "a" / "in_1.png").tobytes()
    untiled = Model.load(tmp_path / "model.safetensors", "cpu").render(tmp_path / "in.png", [[(3, 1), (3, 1)]])[0]
    tiled = torch.from_numpy(np.asarray(again).copy()).permute(2, 0, 1).float() / 255
    assert (tiled - untiled).abs().mean() < 0.01  # close to the untiled render, not equal to it
