from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import collect_batches, write_fruits
from PIL import Image

from lightning_hw.data import DataFormatError, DataNotFoundError, FruitsDataModule


def make_module(root: Path, **kwargs) -> FruitsDataModule:
    options = dict(data_dir=root, batch_size=8, val_size=6, seed=0)
    options.update(kwargs)
    return FruitsDataModule(**options)


@pytest.fixture(scope="module")
def fruits_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fruits")
    write_fruits(root, n_train=10, n_test=4, size=100, seed=0)
    # Fruits-360 holds many other classes; they must be ignored.
    write_fruits(root, classes=("Apple Braeburn",), n_train=3, n_test=2, seed=1)
    return root


def test_attributes_available_before_setup(tmp_path):
    module = make_module(tmp_path)
    assert module.num_classes == 3
    assert module.class_names == ["Carambula", "Lychee", "Pear"]
    assert module.input_shape == (1, 32, 32)
    custom = make_module(tmp_path, class_names=["Apple Braeburn", "Pear"], image_size=24)
    assert (custom.num_classes, custom.input_shape) == (2, (1, 24, 24))


def test_splits_shapes_and_labels(fruits_root):
    module = make_module(fruits_root)
    module.prepare_data()
    module.setup(None)
    assert (len(module.train_dataset), len(module.val_dataset), len(module.test_dataset)) == (24, 6, 12)
    x, y = next(iter(module.train_dataloader()))
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    test_x, test_y = collect_batches(module.test_dataloader())
    assert test_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert module.class_counts()["test"] == [4, 4, 4]


def test_grayscale_resize_matches_pillow(fruits_root):
    module = make_module(fruits_root)
    module.setup("test")
    x, _ = collect_batches(module.test_dataloader())
    with Image.open(fruits_root / "Test" / "Carambula" / "0_100.jpg") as image:
        expected = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    torch.testing.assert_close(x[0, 0], torch.from_numpy(expected))


def test_classes_are_distinguishable(fruits_root):
    # The fakes are class-dependent: class means differ clearly.
    module = make_module(fruits_root)
    module.setup("test")
    x, y = collect_batches(module.test_dataloader())
    means = torch.stack([x[y == label].mean() for label in range(3)])
    assert means[0] < means[1] < means[2]


def test_custom_classes_and_image_size(fruits_root):
    module = make_module(fruits_root, class_names=["Pear", "Apple Braeburn"], image_size=16, val_size=0.2)
    module.setup(None)
    x, y = collect_batches(module.test_dataloader())
    assert x.shape == (6, 1, 16, 16)
    assert y.tolist() == [0] * 4 + [1] * 2
    assert len(module.train_dataset) + len(module.val_dataset) == 13


def test_split_is_seeded(fruits_root):
    def val_images(seed):
        module = make_module(fruits_root, seed=seed)
        module.setup("fit")
        return collect_batches(module.val_dataloader())[0]

    assert torch.equal(val_images(2), val_images(2))
    assert not torch.equal(val_images(2), val_images(3))


def test_normalisation_and_augmentation(fruits_root):
    module = make_module(fruits_root, normalize="per_channel", augment=True, batch_size=100)
    module.setup(None)
    plain = make_module(fruits_root, normalize="per_channel", batch_size=100)
    plain.setup(None)
    torch.manual_seed(0)
    x_aug = torch.stack([module.train_dataset[i][0] for i in range(len(module.train_dataset))])
    x_plain = torch.stack([plain.train_dataset[i][0] for i in range(len(plain.train_dataset))])
    assert abs(x_plain.mean().item()) < 1e-4
    assert not torch.equal(x_aug, x_plain)
    # Flips only mirror: every augmented image equals its original or the mirror image.
    same = (x_aug == x_plain).flatten(1).all(1)
    mirrored = (x_aug == x_plain.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    torch.testing.assert_close(collect_batches(module.val_dataloader())[0], collect_batches(plain.val_dataloader())[0])


def test_missing_training_folder(tmp_path):
    with pytest.raises(DataNotFoundError, match="Training") as error:
        make_module(tmp_path).prepare_data()
    assert "Fruits-360" in str(error.value)


def test_missing_class_folder(tmp_path):
    write_fruits(tmp_path, classes=("Carambula", "Pear"), n_train=8, n_test=2)
    with pytest.raises(DataNotFoundError, match=r"missing class folder .*Training/Lychee"):
        make_module(tmp_path).setup("fit")


def test_empty_class_folder(tmp_path):
    write_fruits(tmp_path, n_train=8, n_test=2)
    for image in (tmp_path / "Test" / "Pear").iterdir():
        image.unlink()
    with pytest.raises(DataNotFoundError, match=r"Test/Pear holds no images"):
        make_module(tmp_path).setup("test")


def test_unreadable_image_names_its_path(tmp_path):
    write_fruits(tmp_path, n_train=8, n_test=2)
    broken = tmp_path / "Training" / "Lychee" / "9_100.jpg"
    broken.write_bytes(b"\xff\xd8\xff truncated jpeg")
    with pytest.raises(DataFormatError) as error:
        make_module(tmp_path).setup("fit")
    assert str(broken) in str(error.value)
