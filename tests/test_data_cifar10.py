import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import collect_batches, write_cifar10, write_cifar10_tarball, write_cifar_batch, write_tarball_with_members

from lightning_hw.data import CIFAR10DataModule, DataFormatError, DataNotFoundError
from lightning_hw.data import cifar10 as cifar10_module

N_PER_BATCH = 20  # 100 training images, 5 held out for validation below


def make_module(root: Path, **kwargs) -> CIFAR10DataModule:
    options = dict(data_dir=root, batch_size=16, val_size=10, seed=0, download=False)
    options.update(kwargs)
    return CIFAR10DataModule(**options)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, n_train_per_batch=N_PER_BATCH, n_test=25, seed=3)
    return root


def test_attributes_available_before_setup(tmp_path):
    module = make_module(tmp_path / "nothing-here")
    assert module.num_classes == 10
    assert module.class_names[0] == "airplane" and module.class_names[9] == "truck"
    assert module.input_shape == (3, 32, 32)
    assert make_module(tmp_path, flatten=True).input_shape == (3072,)


def test_shapes_dtypes_ranges_and_split_sizes(cifar_root):
    module = make_module(cifar_root)
    module.prepare_data()  # data present: no download attempted
    module.setup("fit")
    module.setup("test")
    assert len(module.train_dataset) == 5 * N_PER_BATCH - 10
    assert len(module.val_dataset) == 10
    assert len(module.test_dataset) == 25
    x, y = next(iter(module.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
    assert 0.0 <= x.min() and x.max() <= 1.0
    test_x, test_y = collect_batches(module.predict_dataloader())
    assert test_x.shape == (25, 3, 32, 32)


def test_labels_and_pixels_match_the_batch_files(cifar_root):
    with open(cifar_root / "cifar-10-batches-py" / "test_batch", "rb") as file:
        raw = pickle.load(file, encoding="bytes")
    module = make_module(cifar_root)
    module.setup("test")
    x, y = collect_batches(module.test_dataloader())
    assert y.tolist() == raw[b"labels"]
    # CHW row-major layout of the official files: 1024 red, then green, then blue values.
    expected = torch.from_numpy(raw[b"data"].reshape(-1, 3, 32, 32)).float() / 255
    torch.testing.assert_close(x, expected)


def test_split_is_seeded(cifar_root):
    def val_labels_and_pixels(seed):
        module = make_module(cifar_root, seed=seed)
        module.setup("fit")
        return collect_batches(module.val_dataloader())

    x1, y1 = val_labels_and_pixels(0)
    x2, y2 = val_labels_and_pixels(0)
    x3, _ = val_labels_and_pixels(1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_fraction_val_size(cifar_root):
    module = make_module(cifar_root, val_size=0.2)
    module.setup("fit")
    assert len(module.val_dataset) == 20 and len(module.train_dataset) == 80


def test_val_size_too_large_is_refused(cifar_root):
    with pytest.raises(ValueError, match="no training samples"):
        make_module(cifar_root, val_size=100).setup("fit")


def test_per_channel_normalisation(cifar_root):
    module = make_module(cifar_root, normalize="per_channel", batch_size=1000)
    module.setup("fit")
    x, _ = collect_batches(module.train_dataloader())
    channel_mean = x.mean(dim=(0, 2, 3))
    channel_std = x.std(dim=(0, 2, 3))
    torch.testing.assert_close(channel_mean, torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(channel_std, torch.ones(3), atol=1e-2, rtol=0)


def test_mean_image_normalisation_and_flatten(cifar_root):
    module = make_module(cifar_root, normalize="mean_image", flatten=True, batch_size=1000)
    module.setup(None)
    x, _ = collect_batches(module.train_dataloader())
    assert x.shape == (90, 3072)
    torch.testing.assert_close(x.mean(0), torch.zeros(3072), atol=1e-5, rtol=0)
    test_x, _ = collect_batches(module.test_dataloader())
    assert test_x.shape == (25, 3072)


def test_test_stage_alone_uses_train_statistics(cifar_root):
    fitted = make_module(cifar_root, normalize="per_channel")
    fitted.setup("fit")
    fitted.setup("test")
    test_only = make_module(cifar_root, normalize="per_channel")
    test_only.setup("test")
    torch.testing.assert_close(collect_batches(test_only.test_dataloader())[0], collect_batches(fitted.test_dataloader())[0])


def test_augmentation_changes_train_but_not_val_or_test(cifar_root):
    plain = make_module(cifar_root, batch_size=1000)
    plain.setup(None)
    augmented = make_module(cifar_root, augment=True, batch_size=1000)
    augmented.setup(None)
    torch.manual_seed(0)
    index = list(range(len(plain.train_dataset)))
    x_plain = torch.stack([plain.train_dataset[i][0] for i in index])
    x_aug = torch.stack([augmented.train_dataset[i][0] for i in index])
    assert x_aug.shape == x_plain.shape
    assert not torch.equal(x_aug, x_plain)
    # Crops and flips only move pixels (padding adds zeros): values stay in [0, 1].
    assert x_aug.max() <= 1.0 and x_aug.min() >= 0.0
    torch.testing.assert_close(collect_batches(augmented.val_dataloader())[0], collect_batches(plain.val_dataloader())[0])
    torch.testing.assert_close(collect_batches(augmented.test_dataloader())[0], collect_batches(plain.test_dataloader())[0])


def test_train_order_reproducible(cifar_root):
    first = make_module(cifar_root)
    first.setup("fit")
    second = make_module(cifar_root)
    second.setup("fit")
    assert torch.equal(collect_batches(first.train_dataloader())[1], collect_batches(second.train_dataloader())[1])


def test_workers_and_persistent_workers(cifar_root):
    module = make_module(cifar_root, num_workers=1)
    module.setup("fit")
    x, y = collect_batches(module.val_dataloader())
    assert x.shape == (10, 3, 32, 32) and y.shape == (10,)
    persistent = make_module(cifar_root, num_workers=1, persistent_workers=True)
    persistent.setup("fit")
    assert persistent.val_dataloader().persistent_workers  # flag only; no workers started
    # Without workers the flag is not passed on (DataLoader would refuse it).
    no_workers = make_module(cifar_root, num_workers=0, persistent_workers=True)
    no_workers.setup("fit")
    assert not no_workers.val_dataloader().persistent_workers


def test_dataloader_before_setup_is_an_error(cifar_root):
    with pytest.raises(RuntimeError, match="setup"):
        make_module(cifar_root).train_dataloader()


# -- corrupt and hostile batch files ------------------------------------------


@pytest.fixture
def own_cifar_root(tmp_path) -> Path:
    write_cifar10(tmp_path, n_train_per_batch=N_PER_BATCH, n_test=10, seed=1)
    return tmp_path


def test_missing_batch_file_names_it(own_cifar_root):
    (own_cifar_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_3") as error:
        make_module(own_cifar_root).setup("fit")
    assert "prepare_data" in str(error.value) and cifar10_module.CIFAR10_URL in str(error.value)


def test_truncated_pickle_names_the_file(own_cifar_root):
    path = own_cifar_root / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataFormatError, match="data_batch_2"):
        make_module(own_cifar_root).setup("fit")


class _CreatesMarkerFile:
    """Unpickling this would run os.system and create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_forbidden_global_is_refused_not_executed(own_cifar_root, tmp_path):
    marker = tmp_path / "pwned"
    path = own_cifar_root / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "wb") as file:
        pickle.dump({b"data": _CreatesMarkerFile(marker), b"labels": [0]}, file, protocol=2)
    with pytest.raises(DataFormatError) as error:
        make_module(own_cifar_root).setup("fit")
    message = str(error.value)
    assert "data_batch_1" in message and "forbidden global" in message and "system" in message
    assert not marker.exists()


def test_pickle_with_builtin_eval_is_refused(own_cifar_root):
    class CallsEval:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    path = own_cifar_root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps(CallsEval(), protocol=2))
    with pytest.raises(DataFormatError, match=r"test_batch.*(__builtin__|builtins)\.eval"):
        make_module(own_cifar_root).setup("test")


@pytest.mark.parametrize(
    "batch, expected",
    [
        ({b"data": np.zeros((4, 3072), np.uint8)}, "labels"),
        ({b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4}, "3072"),
        ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, "uint8"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "labels for 4 images"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, "outside 0..9"),
        ([1, 2, 3], "not a CIFAR-10 batch dict"),
    ],
)
def test_batch_with_wrong_keys_or_shape(own_cifar_root, batch, expected):
    path = own_cifar_root / "cifar-10-batches-py" / "data_batch_4"
    if isinstance(batch, dict):
        with open(path, "wb") as file:
            pickle.dump(batch, file, protocol=2)
    else:
        path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataFormatError, match="data_batch_4") as error:
        make_module(own_cifar_root).setup("fit")
    assert expected in str(error.value)


def test_batches_with_any_number_of_images(tmp_path):
    batches_dir = write_cifar10(tmp_path, n_train_per_batch=4, n_test=3)
    labels = np.arange(7) % 10
    write_cifar_batch(batches_dir / "data_batch_5", np.zeros((7, 3, 32, 32), np.uint8), labels, "b5")
    module = make_module(tmp_path, val_size=2)
    module.setup("fit")
    assert len(module.train_dataset) + len(module.val_dataset) == 4 * 4 + 7


# -- download -------------------------------------------------------------------


def test_offline_download_gives_clear_error(tmp_path, monkeypatch):
    def offline(url, destination, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar10_module, "download_file", offline)
    module = make_module(tmp_path, download=True)
    with pytest.raises(DataNotFoundError) as error:
        module.prepare_data()
    message = str(error.value)
    assert cifar10_module.CIFAR10_URL in message
    assert str(tmp_path / "cifar-10-python.tar.gz") in message
    assert "cifar-10-batches-py" in message


def test_download_disabled_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10_module, "download_file", pytest.fail)
    with pytest.raises(DataNotFoundError, match="download=False"):
        make_module(tmp_path, download=False).prepare_data()


def test_download_checks_md5_extracts_and_loads(tmp_path, monkeypatch):
    source = tmp_path / "source.tar.gz"
    md5 = write_cifar10_tarball(source, n_train_per_batch=6, n_test=5)
    calls = []

    def fake_download(url, destination, timeout):
        calls.append(url)
        destination.write_bytes(source.read_bytes())

    monkeypatch.setattr(cifar10_module, "download_file", fake_download)
    monkeypatch.setattr(cifar10_module, "CIFAR10_ARCHIVE_MD5", md5)
    data_dir = tmp_path / "data"
    module = make_module(data_dir, download=True, val_size=5)
    module.prepare_data()
    assert calls == [cifar10_module.CIFAR10_URL]
    module.prepare_data()  # already extracted: no second download
    assert len(calls) == 1
    module.setup(None)
    assert len(module.train_dataset) == 25 and len(module.test_dataset) == 5


def test_wrong_md5_names_the_file(tmp_path, monkeypatch):
    def fake_download(url, destination, timeout):
        destination.write_bytes(b"this is not the archive")

    monkeypatch.setattr(cifar10_module, "download_file", fake_download)
    with pytest.raises(DataFormatError, match=r"cifar-10-python\.tar\.gz.*MD5"):
        make_module(tmp_path, download=True).prepare_data()


def test_manually_placed_archive_is_used_without_download(tmp_path, monkeypatch):
    md5 = write_cifar10_tarball(tmp_path / "cifar-10-python.tar.gz", n_train_per_batch=6, n_test=5)
    monkeypatch.setattr(cifar10_module, "CIFAR10_ARCHIVE_MD5", md5)
    monkeypatch.setattr(cifar10_module, "download_file", pytest.fail)
    make_module(tmp_path, download=False).prepare_data()
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file()


@pytest.mark.parametrize("member", ["../evil", "cifar-10-batches-py/../../evil", "/tmp/evil-absolute"])
def test_tar_member_escaping_target_is_refused(tmp_path, monkeypatch, member):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = data_dir / "cifar-10-python.tar.gz"
    md5 = write_tarball_with_members(archive, {"cifar-10-batches-py/data_batch_1": b"x", member: b"evil"})
    monkeypatch.setattr(cifar10_module, "CIFAR10_ARCHIVE_MD5", md5)
    with pytest.raises(DataFormatError, match="refusing tar member") as error:
        make_module(data_dir).prepare_data()
    assert str(archive) in str(error.value)
    assert not (tmp_path / "evil").exists()
    assert not (data_dir / "cifar-10-batches-py" / "data_batch_1").exists()  # nothing extracted


def test_tar_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "links.tar"
    import tarfile

    with tarfile.open(archive, "w") as tar:
        link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(DataFormatError, match="not a regular file"):
        cifar10_module.safe_extract_tar(archive, target)
