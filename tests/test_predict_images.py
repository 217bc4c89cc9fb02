"""`python -m lightning_hw predict --data.predict_dir DIR`: every image file under DIR,
preprocessed as the model's training data (with the normalisation statistics the
checkpoint carries, no training data needed), one CSV row per file; bad files are
skipped with a warning and listed; and the image reading itself, mode by mode."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fakes import printed_by, write_photo_folder
from lightning_hw.cli import main
from lightning_hw.data import CIFAR10DataModule
from lightning_hw.data.errors import DataFormatError, DataNotFoundError
from lightning_hw.data.images import load_image, read_image_folder
from lightning_hw.models import TwoLayerNet

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
CLASS_NAMES = list(CIFAR10DataModule().class_names)


def model_input(image: Image.Image, mean: torch.Tensor) -> torch.Tensor:
    """The training pipeline by hand: RGB, 32x32 bilinear, [0, 1], minus the mean image, flattened."""
    if image.mode in ("RGBA", "LA"):
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    if image.mode == "I;16":
        image = Image.fromarray(np.rint(np.asarray(image) * (255.0 / 65535.0)).astype(np.uint8), "L")
    rgb = image.convert("RGB")
    if rgb.size != (32, 32):
        rgb = rgb.resize((32, 32), Image.Resampling.BILINEAR)
    # Scaled as the pipeline scales (times 1/255, not divided by 255): the last bit differs otherwise.
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32)
    return (pixels * (1.0 / 255.0) - mean).reshape(-1)


def test_predict_dir_classifies_every_image_as_trained(cifar_run, tmp_path):
    run_dir, checkpoint, data_dir = cifar_run
    folder = tmp_path / "photos"
    images = write_photo_folder(folder, np.random.default_rng())
    # The training data are gone: the statistics must come from the checkpoint.
    moved = tmp_path / "elsewhere"
    shutil.move(data_dir, moved)
    try:
        with pytest.warns(UserWarning, match="skipped") as warned:
            output = printed_by(["predict", "--config", str(run_dir / "config.yaml"), f"--ckpt_path={checkpoint}",
                          f"--data.predict_dir={folder}", f"--trainer.default_root_dir={tmp_path / 'out'}", *QUIET])  # fmt: skip
    finally:
        shutil.move(moved, data_dir)
    warned_about = " ".join(str(warning.message) for warning in warned)
    for bad in ("broken.png", "holiday/truncated.jpg", "pipe.png"):
        assert bad in warned_about
    line = next(line for line in output.splitlines() if line.startswith("predictions:"))
    assert line.startswith(f"predictions: {len(images)} written to ")
    assert "skipped: 3 unreadable files" in output
    rows = list(csv.DictReader(Path(line.rsplit(" written to ", 1)[1]).open()))
    prob_columns = [f"prob_{name}" for name in CLASS_NAMES]
    assert list(rows[0]) == ["path", "class_name", *prob_columns, "status"]
    assert [row["path"] for row in rows] == sorted([*images, "broken.png", "holiday/truncated.jpg", "pipe.png"])

    state = torch.load(checkpoint, weights_only=True)
    mean = state["CIFAR10DataModule"]["mean"]
    reference = CIFAR10DataModule(data_dir=data_dir, val_size=10, normalize="mean_image")
    reference.setup("fit")
    torch.testing.assert_close(mean, reference._preprocessor.mean)  # the train split's mean image, as fit used it
    model = TwoLayerNet.load_from_checkpoint(checkpoint, weights_only=True).eval()
    readable = sorted(images)  # one batch in the predict order: the same kernels as the predict run
    with torch.no_grad():
        batch = torch.stack([model_input(images[name], mean) for name in readable])
        expected_rows = dict(zip(readable, torch.softmax(model(batch), dim=1)))
    for row in rows:
        if row["path"] not in images:
            assert row["status"].startswith("skipped: ") and row["class_name"] == ""
            continue
        assert row["status"] == "predicted"
        probabilities = torch.tensor([float(row[column]) for column in prob_columns])
        expected = expected_rows[row["path"]]
        torch.testing.assert_close(probabilities, expected, atol=2e-6, rtol=0, msg=lambda m: f"{row['path']}: {m}")
        assert row["class_name"] == CLASS_NAMES[int(expected.argmax())]


def test_predict_dir_errors(cifar_run, tmp_path):
    run_dir, checkpoint, _ = cifar_run
    args = ["predict", "--config", str(run_dir / "config.yaml"), f"--ckpt_path={checkpoint}",
            f"--trainer.default_root_dir={tmp_path / 'out'}", *QUIET, "--debug"]  # fmt: skip
    with pytest.raises(DataNotFoundError, match="is not a folder"):
        printed_by([*args, f"--data.predict_dir={tmp_path / 'missing'}"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataNotFoundError, match="holds no image files"):
        printed_by([*args, f"--data.predict_dir={tmp_path / 'empty'}"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="a.jpg"), pytest.raises(DataFormatError, match="none of the 1 image files"):
        printed_by([*args, f"--data.predict_dir={tmp_path / 'bad'}"])


def test_predict_dir_needs_the_statistics_of_a_checkpoint(cifar_run, tmp_path, capsys):
    run_dir, checkpoint, _ = cifar_run
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "photos" / "green.png")
    stripped = torch.load(checkpoint, weights_only=True)
    del stripped["CIFAR10DataModule"]  # as a checkpoint written before DataModules kept their state
    torch.save(stripped, tmp_path / "old.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        printed_by(["predict", "--config", str(run_dir / "config.yaml"), f"--ckpt_path={tmp_path / 'old.ckpt'}",
             f"--data.predict_dir={tmp_path / 'photos'}", f"--trainer.default_root_dir={tmp_path / 'out'}", *QUIET])  # fmt: skip
    assert exit_info.value.code == 1
    assert "needs the train split's statistics, and the checkpoint carries none" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- reading one image ---------------------------------------------------------------------------


def test_load_image_converts_every_mode(tmp_path):
    rng = np.random.default_rng()
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png", (10, 12), 3), rgb.transpose(2, 0, 1))
    gray = np.asarray(Image.fromarray(rgb, "RGB").convert("L"))
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png", (10, 12), 1), gray[None])

    # Transparent pixels become white, opaque ones keep their colour.
    rgba = np.concatenate([rgb, np.zeros((10, 12, 1), np.uint8)], axis=2)
    rgba[:5, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png", (10, 12), 3)
    np.testing.assert_array_equal(loaded[:, :5], rgb[:5].transpose(2, 0, 1))
    assert (loaded[:, 5:] == 255).all()

    # 16-bit gray is scaled to 8 bits, not clipped.
    deep = rng.integers(0, 65536, (9, 7)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(load_image(tmp_path / "deep.png", (9, 7), 1)[0], np.rint(deep / 257.0).astype(np.uint8))

    # An animated GIF gives its first frame; a palette image its colours.
    frames = [Image.new("RGB", (6, 6), colour).convert("P") for colour in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = load_image(tmp_path / "anim.gif", (6, 6), 3)
    assert first[0].min() > 200 and first[2].max() < 50

    # A large JPEG is decoded at a reduced scale (Pillow's draft mode) before the bilinear resize:
    # close to decoding it whole.
    photo = Image.fromarray(np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((40, 40, 1))).astype(np.uint8), "RGB")
    photo.save(tmp_path / "photo.jpg", quality=95)
    with Image.open(tmp_path / "photo.jpg") as whole:
        reference = np.asarray(whole.convert("RGB").resize((16, 12), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    difference = np.abs(load_image(tmp_path / "photo.jpg", (12, 16), 3).astype(int) - reference)
    assert difference.mean() < 2.0 and difference.max() < 40

    # Resizing is bilinear, as the training folders'.
    big = Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8), "RGB")
    big.save(tmp_path / "big.png")
    expected = np.asarray(big.resize((8, 8), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(load_image(tmp_path / "big.png", (8, 8), 3), expected)


# EXIF orientation -> how the stored pixels are turned for display (numpy, rows first).
ORIENTATIONS = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.T,  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # a quarter turn clockwise
    7: lambda a: np.rot90(a, 2).T,  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),  # a quarter turn counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_load_image_applies_the_exif_orientation(tmp_path, orientation):
    # Six 8x8 blocks of distinct grays, 2 x 3 of them: every turn and mirror of it differs.
    stored = np.kron(np.array([[20, 60, 100], [140, 180, 220]], np.uint8), np.ones((8, 8), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored, "L").save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(tmp_path / "photo.jpg") as image:
        assert image.size == (24, 16) and image.getexif()[0x0112] == orientation  # stored unturned
    expected = ORIENTATIONS[orientation](stored)
    loaded = load_image(tmp_path / "photo.jpg", expected.shape, 1)[0]
    assert loaded.shape == expected.shape
    # JPEG's error is a few levels; a wrong turn puts grays 40 or more apart on most pixels.
    assert np.abs(loaded.astype(int) - expected).max() < 16


def test_load_image_names_a_bad_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(DataFormatError, match="bad.png.*Replace or delete"):
        load_image(tmp_path / "bad.png", (8, 8), 1)
    with pytest.raises(ValueError, match="channels must be 1"):
        load_image(tmp_path / "bad.png", (8, 8), 2)


def test_read_image_folder_skips_links_to_devices_and_keeps_order(tmp_path):
    for name in ("b.png", "a/c.png", "a.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4), len(name)).save(tmp_path / name)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "loop").symlink_to(tmp_path)  # a link to a folder is not followed
    with pytest.warns(UserWarning, match="zero.png"):
        images, names, skipped = read_image_folder(tmp_path, (4, 4), 1)
    assert names == ["a.png", "a/c.png", "b.png"] and [name for name, _ in skipped] == ["zero.png"]
    assert images.shape == (3, 1, 4, 4) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == [5, 7, 5]


def test_shipped_configs_resolve_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "fruits_cnn", "--print_config"])
    assert exit_info.value.code == 0 and "FruitCNN" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config=no_such_config"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "no_such_config" in error and "cifar10_twolayer" in error and "sweeps/cifar10_twolayer_grid" in error


def test_overview_help_lists_every_subcommand(capsys):
    main(["--help"])
    text = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "predict", "sweep", "ensemble"):
        assert any(line.split()[:1] == [subcommand] and len(line.split()) > 2 for line in text.splitlines())
    assert "fer2013_cnn_small" in text
