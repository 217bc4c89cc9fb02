from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import collect_batches, write_fruits
from fits import assert_fast_dev_fit
from PIL import Image

from lightning_hw.cli import CONFIG_DIR, main
from lightning_hw.data import DataFormatError, DataNotFoundError, FruitsDataModule
from lightning_hw.data.fruits import FruitAugment, apportion, frame_block_split


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
    # The loader may let the JPEG decoder give gray directly (Pillow's draft mode): its Y channel
    # rounds differently from converting decoded RGB, by at most a few levels.
    torch.testing.assert_close(x[0, 0], torch.from_numpy(expected), atol=3 / 255, rtol=0)


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


def test_missing_training_folder_names_both_layouts(tmp_path):
    with pytest.raises(DataNotFoundError, match="Training") as error:
        make_module(tmp_path).prepare_data()
    message = str(error.value)
    assert "Fruits-360" in message and str(tmp_path / "Data_train") in message and "Data_test/<class>" in message


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


# -- the course's layout ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def course_root(tmp_path_factory) -> Path:
    """The course's layout: Data_train/<Class>/<Class>_train_<i>.png, 32x32 LA, 25 frames per class."""
    return write_fruits(tmp_path_factory.mktemp("course"), n_train=25, n_test=12, size=32, layout="course")


def frame_lookup(root: Path, split: str = "Data_train") -> dict[bytes, tuple[int, int]]:
    """Each stored image's bytes -> (label, frame index), read from the files (channel 0 of LA)."""
    lookup = {}
    for label, name in enumerate(("Carambula", "Lychee", "Pear")):
        for path in (root / split / name).iterdir():
            with Image.open(path) as image:
                assert image.mode == "LA"
                gray = np.asarray(image)[..., 0]
            lookup[gray.tobytes()] = (label, int(path.stem.rsplit("_", 1)[1]))
    assert len(lookup) == sum(1 for _ in (root / split).rglob("*.png")), "fake frames must be distinct"
    return lookup


def frames_of(images: torch.Tensor, lookup: dict) -> list[tuple[int, int]]:
    return [lookup[image[0].numpy().tobytes()] for image in images]


def test_course_layout_is_detected_and_read(course_root):
    module = make_module(course_root, val_size=0.2)
    assert module.detect_layout() == "course"
    module.prepare_data()
    module.setup(None)
    assert module.class_counts() == {"train": [20, 20, 20], "val": [5, 5, 5], "test": [12, 12, 12]}
    x, y = collect_batches(module.test_dataloader())
    assert x.shape == (36, 1, 32, 32) and y.tolist() == [0] * 12 + [1] * 12 + [2] * 12


def test_files_are_read_in_natural_frame_order(course_root):
    # Lexicographic order would put Carambula_test_10 and _11 before _2.
    module = make_module(course_root)
    module.setup("test")
    assert frames_of(module.test_dataset.images, frame_lookup(course_root, "Data_test")) == [
        (label, frame) for label in range(3) for frame in range(12)
    ]


def test_layout_is_detected_case_insensitively_and_can_be_named(tmp_path):
    write_fruits(tmp_path, n_train=4, n_test=2, size=16, layout="course")
    (tmp_path / "Data_train").rename(tmp_path / "data_TRAIN")
    assert make_module(tmp_path).detect_layout() == "course"
    with pytest.raises(DataNotFoundError, match=r"Training not found") as error:
        make_module(tmp_path, layout="fruits-360").prepare_data()
    assert "Data_train" in str(error.value)  # the hint still names both layouts


def test_both_layouts_in_one_folder_must_be_chosen(tmp_path):
    write_fruits(tmp_path, n_train=4, n_test=2, size=16, layout="course")
    write_fruits(tmp_path, n_train=3, n_test=2, size=16, layout="fruits-360")
    with pytest.raises(ValueError, match=r"both fruit layouts.*--data.layout course or --data.layout fruits-360"):
        make_module(tmp_path).prepare_data()
    for layout, per_class in (("course", 4), ("fruits-360", 3)):
        module = make_module(tmp_path, layout=layout, val_size=3)
        module.setup("fit")
        assert len(module.train_dataset) + len(module.val_dataset) == 3 * per_class


def test_links_to_the_same_folders_are_one_layout(tmp_path):
    # What a user did before the course layout was supported: Training -> Data_train, Test -> Data_test.
    write_fruits(tmp_path, n_train=4, n_test=2, size=16, layout="course")
    (tmp_path / "Training").symlink_to(tmp_path / "Data_train")
    (tmp_path / "Test").symlink_to(tmp_path / "Data_test")
    assert make_module(tmp_path).detect_layout() == "course"


def test_missing_test_folder_of_the_detected_layout(tmp_path):
    write_fruits(tmp_path, n_train=4, n_test=2, size=16, layout="course")
    for image in (tmp_path / "Data_test").rglob("*.png"):
        image.unlink()
    for folder in sorted((tmp_path / "Data_test").iterdir()):
        folder.rmdir()
    (tmp_path / "Data_test").rmdir()
    with pytest.raises(DataNotFoundError, match=r"course folder .*Data_test not found"):
        make_module(tmp_path).prepare_data()


def test_data_dir_one_level_too_high_says_where(tmp_path):
    write_fruits(tmp_path / "Data", n_train=4, n_test=2, size=16, layout="course")
    with pytest.raises(DataNotFoundError, match=r"holds them: pass --data.data_dir .*Data\."):
        make_module(tmp_path).prepare_data()


@pytest.mark.parametrize(
    "option, message",
    [(dict(layout="kaggle"), "layout must be one of"), (dict(val_split="sequences"), "val_split must be one of"),
     (dict(val_blocks=0), "val_blocks must be at least 1"), (dict(max_shift=-1), "max_shift")],
)  # fmt: skip
def test_bad_options_are_refused(tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        make_module(tmp_path, **option)


# -- gray conversion --------------------------------------------------------------------------------


def write_image(root: Path, class_name: str, index: int, image: Image.Image) -> None:
    for split, kind in (("Data_train", "train"), ("Data_test", "test")):
        folder = root / split / class_name
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{class_name}_{kind}_{index}.png")


def test_gray_conversion_of_every_mode(tmp_path):
    """L, LA, RGB and RGBA give the same gray; alpha is composited onto white (the photos' background).

    PIL's own convert("L") drops alpha: a transparent pixel would show whatever gray it stores
    (usually black), not the background.
    """
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    opaque = Image.fromarray(rgb)
    expected_gray = np.asarray(opaque.convert("L"))
    alpha = np.full((8, 8), 255, dtype=np.uint8)
    alpha[0, :] = 0  # fully transparent row: white
    alpha[1, :] = 128  # half transparent row: halfway to white
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    la = Image.fromarray(np.dstack([expected_gray, alpha]), "LA")
    for index, image in enumerate([opaque.convert("L"), opaque, opaque.convert("LA"), opaque.convert("RGBA"), la, rgba]):
        for class_name in ("Carambula", "Lychee", "Pear"):
            write_image(tmp_path, class_name, index, image)
    assert pillow_keeps_gray_under_transparency(la)
    module = make_module(tmp_path, image_size=8, val_size=0)
    module.setup("test")
    gray = module.test_dataset.images[:6, 0].numpy().astype(np.int64)
    for opaque_index in range(4):
        np.testing.assert_array_equal(gray[opaque_index], expected_gray)
    for transparent_index in (4, 5):
        np.testing.assert_array_equal(gray[transparent_index, 2:], expected_gray[2:])
        np.testing.assert_array_equal(gray[transparent_index, 0], 255)
        half = (expected_gray[1].astype(np.int64) * 128 + 255 * 127) / 255
        assert np.abs(gray[transparent_index, 1] - half).max() <= 1.0


def pillow_keeps_gray_under_transparency(image: Image.Image) -> bool:
    """Why the loader composites: Pillow's convert("L") keeps the stored gray of transparent pixels."""
    return np.array_equal(np.asarray(image.convert("L")), np.asarray(image)[..., 0])


def test_course_data_gray_is_channel_zero(course_root):
    module = make_module(course_root)
    module.setup("test")
    with Image.open(course_root / "Data_test" / "Pear" / "Pear_test_3.png") as image:
        expected = np.asarray(image)[..., 0]
    np.testing.assert_array_equal(module.test_dataset.images[24 + 3, 0].numpy(), expected)


# -- validation blocks ------------------------------------------------------------------------------


def runs(frames: list[int]) -> list[list[int]]:
    """Sorted frames cut into runs of consecutive numbers."""
    result: list[list[int]] = []
    for frame in sorted(frames):
        if result and frame == result[-1][-1] + 1:
            result[-1].append(frame)
        else:
            result.append([frame])
    return result


@pytest.mark.parametrize("val_size, val_blocks", [(0.2, 1), (0.2, 2), (9, 3), (0.4, 5)])
def test_val_blocks_are_contiguous_per_class_and_disjoint_from_train(course_root, val_size, val_blocks):
    lookup = frame_lookup(course_root)
    module = make_module(course_root, val_size=val_size, val_blocks=val_blocks)
    module.setup("fit")
    train = frames_of(module.train_dataset.images, lookup)
    val = frames_of(module.val_dataset.images, lookup)
    assert not set(train) & set(val)
    assert sorted(train + val) == [(label, frame) for label in range(3) for frame in range(25)]
    assert module.train_dataset.labels.tolist() == [label for label, _ in train]
    expected_share = apportion(len(val), [25, 25, 25])
    for label in range(3):
        val_frames = [frame for frame_label, frame in val if frame_label == label]
        assert len(val_frames) == expected_share[label]
        # Neighbouring blocks may touch and merge into one run; never more runs than blocks.
        assert 1 <= len(runs(val_frames)) <= val_blocks


def test_val_sizes_follow_val_size():
    labels = torch.tensor([0] * 490 + [1] * 490 + [2] * 490)
    for val_size, expected in ((0.1, [49, 49, 49]), (100, [34, 33, 33]), (0.0, [0, 0, 0])):
        train, val = frame_block_split(labels, val_size, 2, seed=0)
        assert torch.bincount(labels[val], minlength=3).tolist() == expected
        assert len(train) + len(val) == 1470 and not set(train.tolist()) & set(val.tolist())
    uneven = torch.tensor([0] * 10 + [1] * 30)
    _, val = frame_block_split(uneven, 8, 1, seed=0)
    assert torch.bincount(uneven[val]).tolist() == [2, 6]  # in proportion to the classes' sizes


def test_each_block_sits_in_its_own_segment():
    labels = torch.zeros(100, dtype=torch.int64)
    for seed in range(20):
        _, val = frame_block_split(labels, 0.2, 4, seed=seed)
        frames = val.tolist()
        for segment in range(4):
            inside = [frame for frame in frames if segment * 25 <= frame < (segment + 1) * 25]
            assert len(inside) == 5 and inside == list(range(inside[0], inside[0] + 5))


def test_val_blocks_are_seeded(course_root):
    def val_frames(seed, **options):
        module = make_module(course_root, seed=seed, val_size=0.2, **options)
        module.setup("fit")
        return frames_of(module.val_dataset.images, frame_lookup(course_root))

    assert val_frames(4) == val_frames(4)
    assert len({tuple(val_frames(seed)) for seed in range(5)}) > 1
    labels = torch.tensor([0] * 40 + [1] * 40)
    first = frame_block_split(labels, 0.25, 2, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, frame_block_split(labels, 0.25, 2, seed=7)))


def test_more_blocks_than_val_frames_gives_single_frames():
    labels = torch.tensor([0] * 20 + [1] * 20)
    _, val = frame_block_split(labels, 4, 5, seed=0)
    assert torch.bincount(labels[val]).tolist() == [2, 2]


def test_val_size_taking_a_whole_class_is_refused():
    labels = torch.tensor([0] * 3 + [1] * 3)
    with pytest.raises(ValueError, match="leaves class 0 no training samples"):
        frame_block_split(labels, 5, 1, seed=0)  # shares 3 and 2: all of class 0


def test_random_val_split_is_still_available(course_root):
    lookup = frame_lookup(course_root)
    module = make_module(course_root, val_split="random", val_size=15)
    module.setup("fit")
    val = frames_of(module.val_dataset.images, lookup)
    assert len(val) == 15
    # A random split scatters frames: far more runs than a few blocks per class.
    assert sum(len(runs([f for label, f in val if label == c])) for c in range(3)) > 6


# -- augmentation -----------------------------------------------------------------------------------


def test_shifts_fill_with_the_border_not_black():
    torch.manual_seed(0)
    images = torch.ones(64, 1, 8, 8)
    images[:, :, 3:5, 3:5] = 0.0  # a dark fruit on white
    shifted = FruitAugment(horizontal_flip=False, max_shift=2)(images)
    assert shifted.shape == images.shape
    assert torch.all(shifted.flatten(1).sum(1) == images.flatten(1).sum(1))  # the whole fruit, no black edge
    assert not torch.equal(shifted, images)


def test_vertical_flips_only_mirror():
    torch.manual_seed(0)
    images = torch.rand(32, 1, 6, 6)
    flipped = FruitAugment(horizontal_flip=False, vertical_flip=True)(images)
    same = (flipped == images).flatten(1).all(1)
    mirrored = (flipped == images.flip(-2)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and bool(mirrored.any()) and bool(same.any())


# -- the command line on the course's layout --------------------------------------------------------


def test_fit_config_on_the_course_layout(course_root, tmp_path, capsys):
    cli = main(["fit", "--config", str(CONFIG_DIR / "fruits_cnn.yaml"), f"--data.data_dir={course_root}",
                f"--trainer.default_root_dir={tmp_path}", "--trainer.fast_dev_run=true",
                "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert_fast_dev_fit(cli, capsys.readouterr().out, "FruitCNN")
    assert cli.datamodule.detect_layout() == "course"
    assert cli.model.hparams.num_classes == 3
