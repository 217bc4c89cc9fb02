from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import collect_batches, write_fer2013_csv, write_fer2013_folders

from lightning_hw.data import DataFormatError, DataNotFoundError, FER2013DataModule

CLASS_NAMES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]


def make_module(root: Path, **kwargs) -> FER2013DataModule:
    options = dict(data_dir=root, batch_size=8, seed=0)
    options.update(kwargs)
    return FER2013DataModule(**options)


@pytest.fixture(scope="module")
def csv_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fer_csv")
    write_fer2013_csv(root, n_per_usage=21, seed=0)
    return root


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fer_folders")
    write_fer2013_folders(root, n_train_per_class=6, n_test_per_class=3, seed=0)
    return root


def test_attributes_available_before_setup(tmp_path):
    module = make_module(tmp_path)
    assert module.num_classes == 7
    assert module.class_names == CLASS_NAMES
    assert module.input_shape == (1, 48, 48)


def test_csv_splits_follow_usage(csv_root):
    module = make_module(csv_root)
    module.prepare_data()
    module.setup("fit")
    module.setup("test")
    assert (len(module.train_dataset), len(module.val_dataset), len(module.test_dataset)) == (21, 21, 21)
    x, y = next(iter(module.train_dataloader()))
    assert x.shape == (8, 1, 48, 48) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_csv_pixels_and_labels_are_read_in_order(csv_root):
    lines = (csv_root / "fer2013.csv").read_text().splitlines()[1:]
    private = [line.split(",") for line in lines if line.endswith("PrivateTest")]
    module = make_module(csv_root)
    module.setup("test")
    x, y = collect_batches(module.test_dataloader())
    assert y.tolist() == [int(row[0]) for row in private]
    first = np.array(private[0][1].split(), dtype=np.float32).reshape(1, 48, 48) / 255
    torch.testing.assert_close(x[0], torch.from_numpy(first))


def test_distribution_table_and_counts(csv_root):
    module = make_module(csv_root)
    counts = module.class_counts()  # loads the splits itself
    assert counts == {"train": [3] * 7, "val": [3] * 7, "test": [3] * 7}
    table = module.class_distribution_table()
    lines = table.splitlines()
    assert lines[0].split() == ["class", "train", "val", "test"]
    assert lines[1].split() == ["Angry", "3", "3", "3"]
    assert lines[-1].split() == ["total", "21", "21", "21"]
    assert len(lines) == 9


def test_class_weights_and_balanced_sampler(tmp_path):
    class_counts = [10, 1, 4, 20, 5, 5, 5]
    write_fer2013_csv(tmp_path, class_counts=class_counts, seed=2)
    module = make_module(tmp_path, balanced_sampler=True, batch_size=50)
    weights = module.class_weights
    counts = torch.tensor(class_counts, dtype=torch.float32)
    torch.testing.assert_close(weights, counts.sum() / (7 * counts))
    assert weights[1] == weights.max()  # rarest class weighs most
    loader = module.train_dataloader()
    epochs = [collect_batches(loader)[1] for _ in range(20)]
    assert not torch.equal(epochs[0], epochs[1])  # each epoch draws afresh
    sampled = torch.cat(epochs)
    assert len(sampled) == 20 * 50
    share = torch.bincount(sampled, minlength=7).float() / len(sampled)
    # Balanced sampling draws every class about 1/7 of the time (Disgust is 1/50 of the data).
    assert share.min() > 0.08 and share.max() < 0.22


def test_balanced_sampler_is_seeded(tmp_path):
    write_fer2013_csv(tmp_path, class_counts=[4, 1, 2, 6, 2, 2, 2], seed=5)
    orders = []
    for _ in range(2):
        module = make_module(tmp_path, balanced_sampler=True)
        module.setup("fit")
        orders.append(collect_batches(module.train_dataloader())[1])
    assert torch.equal(orders[0], orders[1])


def test_normalisation_mean_zero(csv_root):
    module = make_module(csv_root, normalize="per_channel", batch_size=100)
    module.setup("fit")
    x, _ = collect_batches(module.train_dataloader())
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 0.05


def test_augmentation_changes_train_only(csv_root):
    plain = make_module(csv_root, batch_size=100)
    plain.setup(None)
    augmented = make_module(csv_root, augment=True, batch_size=100)
    augmented.setup(None)
    torch.manual_seed(1)
    x_aug = torch.stack([augmented.train_dataset[i][0] for i in range(len(augmented.train_dataset))])
    x_plain = torch.stack([plain.train_dataset[i][0] for i in range(len(plain.train_dataset))])
    assert x_aug.shape == x_plain.shape == (21, 1, 48, 48)
    assert not torch.allclose(x_aug, x_plain)
    # Small rotations/zooms keep most of the picture: close to the original on average.
    assert (x_aug - x_plain).abs().mean() < 0.2
    torch.testing.assert_close(collect_batches(augmented.val_dataloader())[0], collect_batches(plain.val_dataloader())[0])
    torch.testing.assert_close(collect_batches(augmented.test_dataloader())[0], collect_batches(plain.test_dataloader())[0])


def test_folder_layout(folder_root):
    module = make_module(folder_root, val_size=7)
    module.prepare_data()
    module.setup(None)
    assert (len(module.train_dataset), len(module.val_dataset), len(module.test_dataset)) == (35, 7, 21)
    assert module.class_counts()["test"] == [3] * 7
    x, y = collect_batches(module.test_dataloader())
    assert x.shape == (21, 1, 48, 48)
    # Folder i holds class i (sorted class order, not folder listing order).
    assert y.tolist() == [label for label in range(7) for _ in range(3)]


def test_folder_layout_split_is_seeded(folder_root):
    def val_labels(seed):
        module = make_module(folder_root, val_size=0.3, seed=seed)
        module.setup("fit")
        return collect_batches(module.val_dataloader())[0]

    assert torch.equal(val_labels(4), val_labels(4))
    assert not torch.equal(val_labels(4), val_labels(5))


def test_folder_names_are_case_insensitive(tmp_path):
    write_fer2013_folders(tmp_path, n_train_per_class=2, n_test_per_class=1)
    (tmp_path / "train" / "happy").rename(tmp_path / "train" / "Happy")
    (tmp_path / "test").rename(tmp_path / "TEST")
    module = make_module(tmp_path, val_size=2)
    module.setup(None)
    assert module.class_counts()["test"] == [1] * 7


def test_csv_is_preferred_over_folders(tmp_path):
    write_fer2013_folders(tmp_path, n_train_per_class=2, n_test_per_class=1)
    write_fer2013_csv(tmp_path, n_per_usage=14)
    module = make_module(tmp_path)
    module.setup("test")
    assert len(module.test_dataset) == 14


# -- missing and corrupt data ------------------------------------------------------


def test_missing_data_says_where_to_get_it(tmp_path):
    module = make_module(tmp_path)
    for action in (module.prepare_data, lambda: module.setup("fit")):
        with pytest.raises(DataNotFoundError) as error:
            action()
        message = str(error.value)
        assert "Kaggle" in message and "Facial Expression Recognition Challenge" in message
        assert str(tmp_path / "fer2013.csv") in message and str(tmp_path / "train") in message


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


GOOD_PIXELS = " ".join(["7"] * 2304)


@pytest.mark.parametrize(
    "header, rows, expected",
    [
        ("emotion,pixels", [f"0,{GOOD_PIXELS}"], "Usage"),
        ("label,pixels,Usage", [f"0,{GOOD_PIXELS},Training"], "emotion"),
        ("", [], "header"),
        ("emotion,pixels,Usage", [f"0,{GOOD_PIXELS},Training", "1,1 2 3,Training"], "line 3.*2304.*found 3"),
        ("emotion,pixels,Usage", [f"0,{GOOD_PIXELS},Training", f"1,{GOOD_PIXELS} 9,PublicTest"], "line 3.*2305"),
        ("emotion,pixels,Usage", [f"0,{GOOD_PIXELS.replace('7', 'x', 1)},Training"], "line 2.*not all integers"),
        ("emotion,pixels,Usage", [f"0,{GOOD_PIXELS.replace('7', '256', 1)},Training"], "line 2.*0..255"),
        ("emotion,pixels,Usage", [f"0,{GOOD_PIXELS},Training", f"2,{GOOD_PIXELS},Validation"], "line 3.*Usage 'Validation'"),
        ("emotion,pixels,Usage", [f"7,{GOOD_PIXELS},Training"], "line 2.*emotion '7'"),
        ("emotion,pixels,Usage", [f"-1,{GOOD_PIXELS},Training"], "line 2.*emotion '-1'"),
        ("emotion,pixels,Usage", [f"happy,{GOOD_PIXELS},Training"], "line 2.*emotion 'happy'"),
        ("emotion,pixels,Usage", [f"0,{GOOD_PIXELS}"], "line 2.*2 fields"),
    ],
)
def test_corrupt_csv_names_file_and_line(tmp_path, header, rows, expected):
    path = write_csv(tmp_path / "fer2013.csv", header, rows)
    with pytest.raises(DataFormatError, match=expected) as error:
        make_module(tmp_path).setup("fit")
    assert str(path) in str(error.value)


def test_csv_without_rows_for_a_split(tmp_path):
    write_csv(tmp_path / "fer2013.csv", "emotion,pixels,Usage", [f"0,{GOOD_PIXELS},Training"])
    with pytest.raises(DataFormatError, match=r"fer2013\.csv.*no rows for the val split"):
        make_module(tmp_path).setup("fit")


def test_binary_file_instead_of_csv(tmp_path):
    (tmp_path / "fer2013.csv").write_bytes(b"\xff\xfe\x00garbage\x00" * 10)
    with pytest.raises(DataFormatError, match=r"fer2013\.csv"):
        make_module(tmp_path).setup("fit")


def test_unreadable_image_names_its_path(tmp_path):
    write_fer2013_folders(tmp_path, n_train_per_class=2, n_test_per_class=1)
    broken = tmp_path / "train" / "sad" / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataFormatError, match="broken.jpg") as error:
        make_module(tmp_path, val_size=1).setup("fit")
    assert str(broken) in str(error.value)


def test_empty_class_folder(tmp_path):
    write_fer2013_folders(tmp_path, n_train_per_class=2, n_test_per_class=1)
    for image in (tmp_path / "test" / "disgust").iterdir():
        image.unlink()
    with pytest.raises(DataNotFoundError, match=r"test/disgust holds no images"):
        make_module(tmp_path).setup("test")


def test_missing_class_folder(tmp_path):
    write_fer2013_folders(tmp_path, n_train_per_class=2, n_test_per_class=1)
    for image in (tmp_path / "train" / "fear").iterdir():
        image.unlink()
    (tmp_path / "train" / "fear").rmdir()
    with pytest.raises(DataNotFoundError, match=r"missing class folder .*train/fear"):
        make_module(tmp_path, val_size=1).setup("fit")


def test_missing_test_folder(tmp_path):
    write_fer2013_folders(tmp_path, n_train_per_class=2, n_test_per_class=1)
    for image in (tmp_path / "test").rglob("*.*"):
        image.unlink()
    for folder in (tmp_path / "test").iterdir():
        folder.rmdir()
    (tmp_path / "test").rmdir()
    module = make_module(tmp_path, val_size=1)
    module.setup("fit")  # the train folder alone is enough for fitting
    with pytest.raises(DataNotFoundError, match=r"/test"):
        module.setup("test")
