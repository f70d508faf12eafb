"""The task registry on small generated data: Lab conversion, JPEG inputs, label maps and rebalancing, paired
folders, and a train -> sample round trip for every task."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from chimle import tasks
from chimle.colour import grey, lab_to_rgb, lightness, rgb_to_lab
from chimle.config import ConfigError, resolve
from chimle.data import DataError, PairedFolder, save_image
from chimle.labels import CITYSCAPES, LayoutFolder, Palette, load_labels, load_palette, rarity, rebalancing
from chimle.sample import Model
from chimle.train import train
from conftest import tiny_config

# Published CIE Lab (D65) values of the sRGB primaries, white and mid grey.
LAB_REFERENCE = {
    (1.0, 1.0, 1.0): (100.0, 0.0, 0.0),
    (1.0, 0.0, 0.0): (53.2408, 80.0925, 67.2032),
    (0.0, 1.0, 0.0): (87.7347, -86.1827, 83.1793),
    (0.0, 0.0, 1.0): (32.2970, 79.1875, -107.8602),
    (0.0, 0.0, 0.0): (0.0, 0.0, 0.0),
}


def test_lab_matches_published_values_and_round_trips():
    rgb = torch.tensor(list(LAB_REFERENCE), dtype=torch.float64).T.reshape(1, 3, -1, 1)
    lab = rgb_to_lab(rgb)[0, :, :, 0].T
    assert torch.allclose(lab, torch.tensor(list(LAB_REFERENCE.values()), dtype=torch.float64), atol=0.01)
    x = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(x)), x, atol=1e-9)


def test_out_of_gamut_colours_are_clipped_without_a_gradient():
    lab = torch.tensor([[60.0, 120.0, 0.0], [50.0, -300.0, 0.0]]).T.reshape(1, 3, 2, 1).requires_grad_()
    rgb = lab_to_rgb(lab)
    assert rgb.max() <= 1 + 1e-6 and rgb.min() >= 0
    assert rgb[0, 0, 0, 0].item() == pytest.approx(1)  # red of the magenta-ish pixel clipped at 1
    rgb[0, 0, 0, 0].backward()
    assert lab.grad.abs().sum() == 0


def test_colourization_training_lowers_its_loss(tmp_path):
    """The `small` recipe on the built-in photos: the loss of the first steps falls (it rose when the clip of
    linear RGB at 1 passed its gradient through, and the chroma ran away to saturated green)."""
    config = resolve(task="colourization", preset="small", overrides=[
        "train.rounds=1", "train.steps_per_round=40", "train.log_every=1", "train.round_size=16"])
    train(config, tmp_path / "run")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 40
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.85 * first, (first, last)


def test_grey_keeps_lightness_and_drops_chroma():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    g = grey(x)
    assert torch.allclose(lightness(g), lightness(x), atol=1e-3)
    assert rgb_to_lab(g)[:, 1:].abs().max() < 1e-2


def test_colourization_inputs_outputs_and_the_luminance_convention():
    config = tiny_config("colourization")
    task = tasks.get("colourization")
    target = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    inputs, targets = task.pair(target, config)
    assert [tuple(x.shape) for x in inputs] == [(3, 1, 16, 16), (3, 1, 32, 32)]
    assert inputs[1].min() >= 0 and inputs[1].max() <= 1  # L / 100
    assert torch.allclose(inputs[1] * 100, lightness(target), atol=0.05)  # the L of the grey image = the target's
    # Zero chroma gives the grey image; chroma is pre-multiplied by L: a = 127 * a_hat / max(L, 0.01).
    L = inputs[1]
    assert torch.allclose(task.image(torch.zeros(3, 2, 32, 32), inputs, 1), grey(target), atol=2e-3)
    a_hat = torch.full((3, 2, 32, 32), 0.1) * L
    lab = rgb_to_lab(task.image(a_hat, inputs, 1))
    inside = (L > 0.3) & (L < 0.8)  # away from the gamut's clipping
    assert torch.allclose(lab[:, 1:2][inside], torch.full_like(lab[:, 1:2][inside], 12.7), atol=0.3)


def test_decompression_input_is_a_deterministic_jpeg():
    config = tiny_config("decompression", "data.jpeg_quality=5")
    task = tasks.get("decompression")
    target = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    given = task.input_for(target, config)
    assert torch.equal(given, task.input_for(target, config))
    assert (given - target).abs().mean() > 0.05  # quality 5 destroys random noise
    better = task.input_for(target, tiny_config("decompression", "data.jpeg_quality=95"))
    assert (better - target).abs().mean() < (given - target).abs().mean()
    inputs, targets = task.pair(target, config)
    assert torch.allclose(inputs[1], given) and torch.allclose(targets[1], target)
    assert inputs[0].shape[-1] == 16


def test_paper_preset_settings_per_task():
    from chimle.config import resolve

    assert resolve(task="decompression", preset="paper").data.jpeg_quality == 1
    layout = resolve(task="layout", preset="paper")
    assert (layout.data.crop, layout.data.crop_width, layout.model.in_channels) == (256, 512, 20)
    with pytest.raises(ConfigError, match="jpeg_subsampling"):
        resolve(task="decompression", preset="tiny", overrides=["data.jpeg_subsampling=4:1:1"])


# Label maps ----------------------------------------------------------------------------------------------------

PALETTE = Palette(("sky", "grass", "sea"), ((0, 0, 255), (0, 255, 0), (0, 128, 128)), ((0, 0, 0),))


def colour_map(labels: np.ndarray, palette: Palette = PALETTE) -> Image.Image:
    table = np.array([*palette.colours, (0, 0, 0)], dtype=np.uint8)
    return Image.fromarray(table[labels])


def write_layouts(folder, n=4, height=32, width=64):
    """n photos with label maps: top half class 0 (sky), bottom class 1 (grass), a void corner."""
    (folder / "photos").mkdir(parents=True)
    (folder / "labels").mkdir()
    g = np.random.default_rng(0)
    for i in range(n):
        labels = np.zeros((height, width), dtype=np.int64)
        labels[height // 2 :] = 1
        labels[:4, :4] = 3  # void
        photo = np.where(labels[..., None] == 0, [40, 60, 200 + 10 * i], [30, 150 + 20 * i, 40]).astype(np.uint8)
        photo = np.clip(photo + g.integers(0, 10, photo.shape), 0, 255).astype(np.uint8)
        Image.fromarray(photo).save(folder / "photos" / f"img{i}.png")
        colour_map(labels).save(folder / "labels" / f"img{i}.png")
    return folder / "photos", folder / "labels"


def test_colour_and_index_label_maps_read_the_same(tmp_path):
    labels = np.array([[0, 1, 2], [3, 1, 0]])
    colour_map(labels).save(tmp_path / "colour.png")
    index = np.where(labels == 3, 255, labels).astype(np.uint8)
    Image.fromarray(index, mode="L").save(tmp_path / "index.png")
    expected = torch.tensor(labels)
    assert torch.equal(load_labels(tmp_path / "colour.png", PALETTE), expected)
    assert torch.equal(load_labels(tmp_path / "index.png", PALETTE), expected)


def test_unknown_label_colours_are_listed_with_their_files(tmp_path):
    photos, labels = write_layouts(tmp_path, n=2)
    bad = np.asarray(Image.open(labels / "img1.png")).copy()
    bad[0, 10] = (1, 2, 3)
    bad[5, 5] = (9, 9, 9)
    Image.fromarray(bad).save(labels / "img1.png")
    with pytest.raises(DataError) as error:
        LayoutFolder(photos, labels, PALETTE, crop=(16, 32))
    message = str(error.value)
    assert "img1.png" in message and "(1, 2, 3)" in message and "(9, 9, 9)" in message
    assert "img0.png" not in message and "sky (0, 0, 255)" in message and "data.palette" in message


def test_palette_json_and_cityscapes(tmp_path):
    path = tmp_path / "palette.json"
    path.write_text(json.dumps({"classes": [{"name": "a", "colour": [1, 2, 3]}, {"name": "b", "colour": [4, 5, 6]}],
                                "void": [[0, 0, 0]]}))
    palette = load_palette(str(path))
    assert palette.names == ("a", "b") and palette.channels == 3 and palette.void == ((0, 0, 0),)
    path.write_text(json.dumps({"classes": [{"colour": [1, 2]}]}))
    with pytest.raises(DataError, match="not a palette file"):
        load_palette(str(path))
    assert CITYSCAPES.classes == 19 and load_palette("cityscapes") is CITYSCAPES


def test_layout_examples_are_aligned_one_hot_non_square(tmp_path):
    photos, labels = write_layouts(tmp_path)
    folder = LayoutFolder(photos, labels, PALETTE, crop=(16, 32))
    for number in range(6):
        e = folder.example(0, number)
        assert e.image.shape == (3, 16, 32) and e.source.shape == (4, 16, 32) and e.weight is None
        assert torch.equal(e.source.sum(0), torch.ones(16, 32))  # exactly one class (or void) per pixel
        sky = e.source[0].bool()
        assert (e.image[2][sky] > 0.7).all() and (e.image[2][e.source[1].bool()] < 0.3).all()  # aligned with the photo


def test_rarity_favours_the_odd_one_out():
    colours = torch.tensor([[0.1, 0.1, 0.1], [0.11, 0.1, 0.1], [0.1, 0.12, 0.1], [0.9, 0.2, 0.5], [float("nan")] * 3],
                           dtype=torch.float64)
    r = rarity(colours)
    assert torch.isnan(r[4]) and r[3] == r[:4].max() and r[3] > 3 * r[0]
    assert torch.isclose(r[:4].mean(), torch.tensor(1.0, dtype=torch.float64))


def test_rebalancing_draws_rare_examples_more_often_and_weights_their_pixels(tmp_path):
    photos, labels = write_layouts(tmp_path, n=5)
    odd = np.asarray(Image.open(photos / "img4.png")).copy()
    odd[16:] = (200, 30, 200)  # purple "grass": a rare appearance of class 1
    Image.fromarray(odd).save(photos / "img4.png")
    images = [torch.from_numpy(np.array(Image.open(photos / f"img{i}.png"))).permute(2, 0, 1).float() / 255
              for i in range(5)]
    maps = [load_labels(labels / f"img{i}.png", PALETTE) for i in range(5)]
    balance = rebalancing(images, maps, PALETTE, [], floor=0.1)
    assert balance.classes == [0, 1]  # the classes present in at least half of the images
    assert balance.image_weights.argmax() == 4
    assert balance.pixel_weights[4, 1] == 1.0 and balance.pixel_weights[0, 1] < 0.5
    assert torch.all(balance.pixel_weights[:, 2:] == 1)  # absent class and void keep weight 1
    folder = LayoutFolder(photos, labels, PALETTE, crop=(16, 32), rebalance=True)
    drawn = [folder.example(0, n).file.stem for n in range(200)]
    assert drawn.count("img4") > 2 * 200 / 5
    e = folder.example(0, 0)
    assert e.weight.shape == (1, 16, 32) and e.weight.min() >= 0.1 and e.weight.max() <= 1


# Paired data ---------------------------------------------------------------------------------------------------


def random_photo(seed, h=40, w=48):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def test_paired_folders_are_matched_by_stem_and_cropped_together(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    for i in range(3):
        target = random_photo(i)
        save_image(target, tmp_path / "out" / f"p{i}.png")
        save_image(1 - target, tmp_path / "in" / f"p{i}.png")
    folder = PairedFolder(tmp_path / "out", tmp_path / "in", crop=32)
    for number in range(5):
        e = folder.example(3, number)
        assert torch.allclose(e.source, 1 - e.image, atol=1 / 255 + 1e-6)


def test_aligned_ab_images_split_into_input_left_and_target_right(tmp_path):
    target = random_photo(7)
    save_image(torch.cat([1 - target, target], dim=-1), tmp_path / "ab.png")
    e = PairedFolder(tmp_path, None, crop=32).example(0, 0)
    assert torch.allclose(e.source, 1 - e.image, atol=1 / 255 + 1e-6)


def test_unmatched_or_differently_sized_pairs_are_listed(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    for stem in ("a", "b"):
        save_image(random_photo(0), tmp_path / "out" / f"{stem}.png")
    save_image(random_photo(0), tmp_path / "in" / "a.png")
    save_image(random_photo(0), tmp_path / "in" / "c.png")
    with pytest.raises(DataError) as error:
        PairedFolder(tmp_path / "out", tmp_path / "in", crop=32)
    assert "2 unmatched" in str(error.value) and "b: only in" in str(error.value) and "c: only in" in str(error.value)
    (tmp_path / "in" / "c.png").unlink()
    save_image(random_photo(0, h=44), tmp_path / "in" / "b.png")
    with pytest.raises(DataError, match="b.png is 48x40 px but its input .* is 48x44 px"):
        PairedFolder(tmp_path / "out", tmp_path / "in", crop=32)


# Every task end to end ------------------------------------------------------------------------------------------


def task_data(task, tmp_path):
    """Overrides that point a tiny run at generated data for the task."""
    if task == "paired":
        for i in range(3):
            target = random_photo(i)
            save_image(torch.cat([target * 0.3, target], dim=-1), tmp_path / "pairs" / f"p{i}.png")
        return [f"data.path={tmp_path / 'pairs'}"]
    if task == "layout":
        photos, labels = write_layouts(tmp_path)
        palette = tmp_path / "palette.json"
        palette.write_text(json.dumps({"classes": [{"name": n, "colour": list(c)}
                                                   for n, c in zip(PALETTE.names, PALETTE.colours)],
                                       "void": [[0, 0, 0]]}))
        return [f"data.path={photos}", f"data.inputs={labels}", f"data.palette={palette}", "data.rebalance=true",
                "data.crop=16", "data.crop_width=32"]
    for i in range(3):
        save_image(random_photo(i), tmp_path / "photos" / f"p{i}.png")
    return [f"data.path={tmp_path / 'photos'}"]


@pytest.mark.parametrize("task", ["colourization", "decompression", "layout", "paired"])
def test_every_task_trains_and_samples(task, tmp_path):
    config = tiny_config(task, "train.rounds=1", *task_data(task, tmp_path))
    model_file = train(config, tmp_path / "run")
    model = Model.load(model_file, device="cpu")
    if task == "layout":
        given = model.task.load_input(tmp_path / "labels" / "img0.png", model.config)
        assert given.shape == (4, 32, 64)
    else:
        given = random_photo(9, 32, 32)
    samples = model.sample(given, n=3, seed=5)
    assert samples.shape == (3, 3, *given.shape[-2:]) and torch.isfinite(samples).all()
    assert samples.min() >= 0 and samples.max() <= 1
    assert torch.equal(samples, model.sample(given, n=3, seed=5))
    assert not torch.equal(samples[0], samples[1])  # different codes, different outputs
    if task == "colourization":  # any image is reduced to L: colour and grey inputs give the same samples
        assert torch.allclose(model.sample(grey(given[None])[0], n=3, seed=5), samples, atol=2e-3)


def test_tasks_that_need_given_inputs_say_so(tmp_path):
    with pytest.raises(ConfigError, match="A|B images"):
        train(tiny_config("paired", "train.rounds=1"), tmp_path / "run")
    with pytest.raises(tasks.TaskError, match="cannot make its input"):
        tasks.get("paired").input_for(torch.rand(1, 3, 8, 8), tiny_config("paired"))
