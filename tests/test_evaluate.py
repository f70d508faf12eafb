"""`chimle evaluate`: crops and matching, consistency, the zero-code baseline, both modes end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from chimle import tasks
from chimle.checkpoint import save_model
from chimle.cli import main
from chimle.data import DataError, builtin_photos, list_images, load_image
from chimle.evaluate import Options, Scorer, crop_boxes, evaluate_samples, samples_by_stem
from chimle.generator import Generator
from chimle.metrics import manifold
from chimle.metrics.plot import per_input_points
from chimle.sample import Model
from conftest import randomize, tiny_config


def model_file(tmp_path, task="super-resolution"):
    config = tiny_config(task)
    path = tmp_path / f"{task}.safetensors"
    save_model(path, randomize(Generator(config.model), seed=4), config)
    return path


def smooth_image(w, h, g):
    """A smooth random colour image (upsampled noise)."""
    small = torch.rand(1, 3, h // 4, w // 4, generator=g)
    image = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def write_photos(folder, sizes, seed=0):
    """Smooth random images photo0.png, photo1.png, ... of the given (width, height); returns their stems."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i, (w, h) in enumerate(sizes):
        smooth_image(w, h, g).save(folder / f"photo{i}.png")
    return [f"photo{i}" for i in range(len(sizes))]


def test_crop_boxes():
    assert crop_boxes(50, 37, 0, False, 4, 4) == [(0, 0, 48, 36)]  # whole image trimmed to multiples of 4
    assert crop_boxes(100, 70, 32, False, 16, 16) == [(32, 16, 32, 32)]  # centred, corners on multiples of 16
    assert crop_boxes(70, 100, 32, True, 4, 1) == [(3, 2, 32, 32), (3, 34, 32, 32), (3, 66, 32, 32),
                                                   (35, 2, 32, 32), (35, 34, 32, 32), (35, 66, 32, 32)]
    with pytest.raises(DataError, match="smaller than the 64 px crop"):
        crop_boxes(40, 100, 64, False, 4, 4)
    with pytest.raises(Exception, match="multiple of 16"):
        crop_boxes(100, 100, 40, False, 16, 16)
    with pytest.raises(DataError, match="too small"):
        crop_boxes(9, 30, 0, False, 1, 1)


def test_samples_by_stem(tmp_path):
    for name in ["a_1.png", "a_0.png", "a_10.png", "b_c_2.png", "notes.png"]:
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    groups = samples_by_stem(tmp_path)
    assert {k: [p.name for p in v] for k, v in groups.items()} == {
        "a": ["a_0.png", "a_1.png", "a_10.png"], "b_c": ["b_c_2.png"]}


@pytest.mark.parametrize("task", ["super-resolution", "colourization", "decompression"])
def test_the_ground_truth_is_consistent_with_its_input(task, rng):
    config = tiny_config(task)
    entry = tasks.get(task)
    target = torch.rand(2, 3, 16, 16, generator=rng)
    given = entry.input_for(target[:1], config)[0]
    perfect = entry.consistency(target[:1], given, config)
    other = entry.consistency(target[1:], given, config)
    if task == "colourization":  # mean |L error|, Lab L units
        assert perfect.item() < 0.05 and other.item() > 5
    else:  # PSNR of the degraded output against the input, dB
        assert perfect.item() > 60 and other.item() < 30
    assert tasks.get("paired").consistency(target, given, config) is None


def test_zero_codes_is_one_fixed_output(tmp_path, rng):
    model = Model.load(model_file(tmp_path), device="cpu")
    image = torch.rand(3, 6, 5, generator=rng)
    zero = model.zero_codes(image)
    assert zero.shape == (1, 3, 24, 20)
    assert torch.equal(zero, model.zero_codes(image))
    assert (model.sample(image, n=2, seed=0) - zero).abs().amax((1, 2, 3)).min() > 1e-3


def test_evaluate_model_then_its_saved_samples(tmp_path, capsys):
    model = model_file(tmp_path)
    write_photos(tmp_path / "data", [(40, 32), (36, 44)])
    out, saved = tmp_path / "eval" / "report", tmp_path / "saved"
    code = main(["evaluate", "--model", str(model), "--data", str(tmp_path / "data"), "-n", "3", "--seed", "2",
                 "--lpips", "alex", "--batch", "2", "--out", str(out), "--save-samples", str(saved), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr()
    assert "| model (3 samples) |" in printed.out and "FID from 2 real images" in printed.err
    assert "precision and recall need more than 3 images" in printed.err  # 2 targets: too few for k = 3
    report = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# chimle evaluation") and "| precision ↑ | recall ↑ |" in md and "](report.png)" in md
    with Image.open(out.with_suffix(".png")) as plot:
        assert plot.size == (1040, 448)
    p, methods = report["protocol"], report["methods"]
    assert p["samples_per_input"] == 3 and p["targets"] == 2 and p["seed"] == 2 and p["task"] == "super-resolution"
    assert "ResizeBilinear" in p["fid"]["resize"] and len(p["fid"]["weights_sha256"]) == 64
    assert p["fid"]["resize_mode"] == "tf" and p["manifold"]["precision_recall_k"] == 3
    assert p["manifold"]["density_coverage_k"] == 5 and p["manifold"]["real_images"] == 2
    assert "45 dB" in p["consistent"]["rule"] and p["fjd"]["alpha"] > 0
    assert p["fid"]["real_images"] == 2 and p["fid"]["generated_images"] == {"model": 6, "zero_codes": 2, "baseline": 2}
    assert p["diversity"]["pairs_per_input"] == 3 and p["diversity"]["inputs"] == 2
    assert p["fwv"]["distance"]["name"] == "lpips" and p["fwv"]["spread"]["name"] == "lpips"
    assert "downsampled x4" in p["consistency"] and p["baseline"] == "bicubic"
    assert list(methods) == ["model", "zero_codes", "baseline"]
    m = methods["model"]
    assert set(m["fwv"]) == {"0.3", "0.2", "0.15"} and m["fwv"]["0.3"] >= m["fwv"]["0.2"] >= m["fwv"]["0.15"] > 0
    assert m["diversity_lpips"] > 0 and m["lpips_best"] <= m["lpips_mean"] and m["psnr_best"] >= m["psnr_mean"]
    assert all(np.isfinite(m[k]) for k in ("fid", "fid_first_sample", "kid", "ssim_mean", "consistency_mean"))
    assert methods["zero_codes"]["diversity_lpips"] is None and methods["zero_codes"]["fwv"] is None
    assert m["precision"] is None and np.isfinite(m["fjd"]) and np.isfinite(m["fjd_first_sample"])
    # A random generator is not consistent with its input; bicubic up then down nearly is.
    assert m["consistent_share"] == 0 and m["consistent_diversity"] is None
    for rows in report["per_input"].values():  # consistent: at least 45 dB
        assert rows["baseline"]["consistent"] == [value >= 45 for value in rows["baseline"]["consistency"]]
    assert report["per_input"]["photo0"]["model"]["consistent"] == [False] * 3
    # Bicubic up then down is nearly the input; a random generator's output is not.
    assert methods["baseline"]["consistency_mean"] > max(20, m["consistency_mean"] + 5)
    assert len(report["per_input"]["photo0"]["model"]["lpips"]) == 3
    points, row = per_input_points(report), report["per_input"]["photo0"]
    assert points["model"][0] == (min(row["model"]["lpips"]), row["model"]["diversity_lpips"])
    assert points["baseline"][0] == (row["baseline"]["lpips"][0], 0.0)  # one output: no diversity

    # The saved samples, scored as another method's would be, give the same numbers.
    assert len(list((saved / "samples").iterdir())) == 6
    again = evaluate_samples(saved / "samples", saved / "real", saved / "inputs", task="super-resolution",
                             options=Options(lpips="alex", batch=2, device="cpu", consistency_tolerance=0.0))
    s = again["methods"]["samples"]
    assert again["protocol"]["samples_per_input"] == 3 and again["methods"]["baseline"]["label"] == "bicubic"
    assert s["fid"] == pytest.approx(m["fid"], rel=1e-6)  # Inception sees the same uint8 levels
    assert s["psnr_mean"] == pytest.approx(m["psnr_mean"], abs=0.05)  # PNG rounding
    assert s["diversity_lpips"] == pytest.approx(m["diversity_lpips"], abs=0.01)
    assert s["consistency_mean"] == pytest.approx(m["consistency_mean"], abs=0.5)
    assert s["fjd"] == pytest.approx(m["fjd"], rel=1e-6)  # the saved inputs are the model's inputs
    # With a tolerance of 0 dB every sample is consistent: the consistent diversity is the diversity.
    assert again["protocol"]["consistent"]["bound"] == 0.0 and s["consistent_share"] == 1
    assert s["consistent_diversity"] == pytest.approx(s["diversity_lpips"], rel=1e-6)


def test_external_samples_without_task_or_inputs(tmp_path, capsys):
    stems = write_photos(tmp_path / "real", [(32, 32), (32, 32)])
    (tmp_path / "samples").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "samples" / f"{stems[0]}_0.png")
    with pytest.raises(DataError, match="no samples STEM_K.png for 1 real image"):
        evaluate_samples(tmp_path / "samples", tmp_path / "real")
    Image.new("RGB", (16, 16)).save(tmp_path / "samples" / f"{stems[1]}_0.png")
    with pytest.raises(DataError, match="samples must have the size of their real image"):
        evaluate_samples(tmp_path / "samples", tmp_path / "real", options=Options(lpips="alex"))

    g = torch.Generator().manual_seed(1)
    for stem in stems:
        for k in range(2):
            smooth_image(32, 32, g).save(tmp_path / "samples" / f"{stem}_{k}.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "samples" / "unknown_0.png")
    out = tmp_path / "report.json"
    command = ["evaluate", "--samples", str(tmp_path / "samples"), "--real", str(tmp_path / "real"), "--lpips", "alex",
               "--out", str(out), "--device", "cpu", "--fid-resize", "clean"]
    assert main([*command, "--diversity-pairs", "2"]) == 2
    assert "--diversity-pairs 2 needs at least 3 samples per input" in capsys.readouterr().err
    assert main([*command, "--consistency-tolerance", "nan"]) == 2
    assert "must be a finite number" in capsys.readouterr().err
    assert main([*command, "--diversity-pairs", "1"]) == 0
    report = json.loads(out.read_text())
    assert list(report["methods"]) == ["samples"] and report["protocol"]["baseline"] is None
    p = report["protocol"]
    assert p["fid"]["resize_mode"] == "clean" and "Pillow BICUBIC" in p["fid"]["resize"]
    assert p["diversity"]["pairs_per_input"] == 1 and "consecutive pairs" in p["diversity"]["definition"]
    assert p["fjd"]["alpha"] is None and p["consistent"] is None  # no inputs, no task
    s = report["methods"]["samples"]
    assert s["outputs_per_input"] == 2 and s["consistency_mean"] is None and s["diversity_lpips"] > 0
    assert s["fjd"] is None and s["consistent_share"] is None and s["precision"] is None  # 2 real images
    assert any("unknown" in w for w in report["warnings"])
    assert "| samples (samples) |" in capsys.readouterr().out


def test_paired_model_needs_inputs(tmp_path, capsys):
    model = model_file(tmp_path, "paired")
    code = main(["evaluate", "--model", str(model), "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert code == 2 and "--inputs DIR" in capsys.readouterr().err


def photo_tiles(count, side=32):
    """`count` side x side tiles of the built-in photos (a few from each)."""
    photos = [load_image(p) for p in list_images(builtin_photos("train")) + list_images(builtin_photos("heldout"))]
    tiles = [photo[:, y : y + side, x : x + side] for y in (20, 110, 200) for x in (20, 110, 200) for photo in photos]
    return tiles[:count]


def test_real_images_against_themselves_and_a_collapsed_set():
    """The real set scored as a method, through the Scorer as reports do it: precision = recall = coverage = 1 and
    density (k + 1) / k. One real image repeated is as realistic as a real image but covers little."""
    tiles = photo_tiles(24)
    scorer = Scorer(Options(lpips="alex", fid_resize="clean"), torch.device("cpu"))
    features = [scorer.add_real(tile) for tile in tiles]
    for i, (tile, target_features) in enumerate(zip(tiles, features)):
        scorer.add("self", "the real images", f"tile{i}", tile[None], tile, target_features, None)
    same = scorer.summary("self")
    assert (same["precision"], same["recall"], same["coverage"]) == (1, 1, 1)
    assert same["density"] == pytest.approx(6 / 5) and abs(same["fid"]) < 1e-6
    # Each tile repeated in turn: recall 1/N (only the tile itself is reached). Coverage depends on the tile (a
    # central one lies in many of the balls), but its mean over the tiles is (k + 1) / N, as every ball holds its
    # centre and k neighbours.
    real = np.concatenate(scorer.real)
    collapsed = [manifold.prdc(real, np.repeat(real[j : j + 1], 8, axis=0)) for j in range(len(real))]
    assert all(c["precision"] == 1 and c["recall"] == 1 / 24 for c in collapsed)
    assert np.mean([c["coverage"] for c in collapsed]) == pytest.approx(6 / 24)
