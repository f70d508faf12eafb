import io

import numpy as np
import pytest
import torch
from PIL import Image

from chimle.cli import main
from chimle.data import DataError, ImageFolder, dihedral, load_image


def save(path, array, mode=None, **kwargs):
    Image.fromarray(array, mode=mode).save(path, **kwargs)
    return path


def photo(h=40, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_formats_become_rgb_in_unit_range(tmp_path):
    rgb = photo()
    assert load_image(save(tmp_path / "a.png", rgb)).shape == (3, 40, 48)
    grey = load_image(save(tmp_path / "g.png", rgb[:, :, 0]))
    assert grey.shape == (3, 40, 48) and torch.equal(grey[0], grey[1])
    sixteen = (rgb[:, :, 0].astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(tmp_path / "16.png")
    torch.testing.assert_close(load_image(tmp_path / "16.png")[0], torch.from_numpy(rgb[:, :, 0]).float() / 255)
    rgba = np.dstack([rgb, np.zeros_like(rgb[:, :, 0])])  # fully transparent: white
    assert load_image(save(tmp_path / "t.png", rgba)).min() == 1.0
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    for name in ("p.png", "c.jpg"):
        image = load_image(tmp_path / name)
        assert image.shape == (3, 40, 48) and 0 <= image.min() and image.max() <= 1


def test_exif_orientation_is_honoured(tmp_path):
    image = Image.fromarray(photo(20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (3, 30, 20)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jpg", b"", "empty"),
        ("text.png", b"this is not an image at all", "not an image"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message) as error:
        load_image(tmp_path / name)
    assert name in str(error.value)


def test_truncated_jpeg_is_a_clear_error(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(photo(64, 64)).save(buffer, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError, match="cut.jpg.*truncated"):
        load_image(tmp_path / "cut.jpg")


def test_training_folder_refuses_or_skips_bad_files(tmp_path):
    save(tmp_path / "good.png", photo(40, 40))
    save(tmp_path / "small.png", photo(10, 40))
    (tmp_path / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError) as error:
        ImageFolder(tmp_path, crop=32)
    message = str(error.value)
    assert "2 unusable" in message and "small.png: 40x10 px is smaller than the 32x32 px crop" in message
    assert "broken.jpg: not a readable image" in message and "--skip-bad" in message
    with pytest.warns(UserWarning, match="skipping"):
        folder = ImageFolder(tmp_path, crop=32, skip_bad=True)
    assert [p.name for p in folder.files] == ["good.png"]


def test_examples_are_deterministic_and_augmented(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.png", photo(50, 60, seed=i))
    folder = ImageFolder(tmp_path, crop=32)
    a = [folder.example(7, n).image for n in range(6)]
    b = [ImageFolder(tmp_path, crop=32).example(7, n).image for n in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(x.shape == (3, 32, 32) for x in a)
    # One pass visits every image once.
    assert sorted(folder.example(7, n).file.name for n in range(3)) == ["0.png", "1.png", "2.png"]
    x = torch.arange(16.0).view(1, 4, 4)
    assert len({tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}) == 8


def test_cli_reports_bad_data_without_a_traceback(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.png").write_bytes(b"nope")
    code = main(["train", "--preset", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "broken.png" in err and "Traceback" not in err
    code = main(["train", "--preset", "tiny", "-o", "model.blocks=0", "--out", str(tmp_path / "run2")])
    assert code == 2 and "model.blocks=0 must be >= 1" in capsys.readouterr().err
