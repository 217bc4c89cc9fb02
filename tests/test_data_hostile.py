"""Corrupt and hostile data files for every DataModule: each gives a DataFormatError /
DataNotFoundError naming the file and saying what to do, and no file can run code
(restricted unpickling, safe extraction, npz without pickles)."""

import builtins
import codecs
import io
import os
import pickle
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fakes import CallOnUnpickle, tar_entry, write_cifar10, write_fer2013_csv, write_fruits, write_tar
from PIL import Image

from lightning_hw.data import (
    CIFAR10DataModule,
    DataFormatError,
    DataNotFoundError,
    DigitsDataModule,
    FER2013DataModule,
    FruitsDataModule,
)
from lightning_hw.data import cifar10 as cifar10_module
from lightning_hw.data import digits as digits_module

# -- CIFAR-10 pickled batches ---------------------------------------------------------


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    write_cifar10(tmp_path / "data", n_train_per_batch=4, n_test=4, seed=2)
    return tmp_path / "data"


def cifar_fit(root: Path) -> None:
    CIFAR10DataModule(data_dir=root, val_size=2, download=False).setup("fit")


def batch_file(root: Path) -> Path:
    return root / "cifar-10-batches-py" / "data_batch_2"


def marker_commands(marker: Path) -> list:
    """Calls that would create `marker` if an unpickler ran them."""
    return [
        CallOnUnpickle(os.system, f"touch {marker}"),
        CallOnUnpickle(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        CallOnUnpickle(builtins.eval, f"open({str(marker)!r}, 'w')"),
        CallOnUnpickle(subprocess.call, ["touch", str(marker)]),
        CallOnUnpickle(Path.touch, marker),
    ]


@pytest.mark.parametrize("index", range(5), ids=["os.system", "exec", "eval", "subprocess.call", "Path.touch"])
@pytest.mark.parametrize("where", ["top", "in_data", "in_labels"])
def test_pickle_that_would_run_code_is_refused(cifar_root, tmp_path, index, where):
    marker = tmp_path / "side-effect"
    payload = marker_commands(marker)[index]
    batch = {
        "top": payload,
        "in_data": {b"data": payload, b"labels": [0]},
        "in_labels": {b"data": np.zeros((1, 3072), np.uint8), b"labels": [payload]},
    }[where]
    batch_file(cifar_root).write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataFormatError, match="forbidden global") as error:
        cifar_fit(cifar_root)
    assert str(batch_file(cifar_root)) in str(error.value) and "download" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("encoding", ["zlib_codec", "rot13", "base64"])
def test_pickle_calling_codecs_beyond_latin1_is_refused(cifar_root, encoding):
    text = "eJzLSM3JyQcABiwCFQ==" if encoding == "base64" else "abc"
    batch_file(cifar_root).write_bytes(pickle.dumps({b"data": CallOnUnpickle(codecs.encode, text, encoding)}, protocol=2))
    with pytest.raises(DataFormatError, match="data_batch_2.*not how a pickle stores bytes"):
        cifar_fit(cifar_root)


@pytest.mark.parametrize("keep", [0, 1, 2, 100, 0.5, -1], ids=lambda k: f"keep={k}")
def test_truncated_or_empty_pickle_names_the_file(cifar_root, keep):
    path = batch_file(cifar_root)
    content = path.read_bytes()
    path.write_bytes(content[: int(keep * len(content)) if isinstance(keep, float) else keep if keep >= 0 else len(content) - 1])
    with pytest.raises(DataFormatError, match="cannot unpickle CIFAR-10 batch") as error:
        cifar_fit(cifar_root)
    assert str(path) in str(error.value) and "download the data set again" in str(error.value)


def test_garbage_instead_of_pickle(cifar_root):
    batch_file(cifar_root).write_bytes(np.random.default_rng().bytes(4096))
    with pytest.raises(DataFormatError, match="data_batch_2"):
        cifar_fit(cifar_root)


@pytest.mark.parametrize(
    "data, labels, expected",
    [
        (np.zeros((3, 3072), np.uint8), [0.0, 1.5, 2.0], "must be integers, found float64"),
        (np.zeros((3, 3072), np.uint8), ["1", "2", "3"], "must be integers"),
        (np.zeros((3, 3072), np.uint8), [True, False, True], "must be integers, found bool"),
        (np.zeros((3, 3072), np.uint8), [0, 1, 2**70], "must be integers, found object"),
        (np.zeros((3, 3072), np.uint8), [[0], [1, 2], [3]], "labels"),
        (np.zeros((3, 3072), np.uint8), [-1, 0, 1], "outside 0..9"),
        (np.zeros((3, 32, 96), np.uint8), [0, 1, 2], r"\(N, 3072\)"),
        (np.zeros((3, 3072), np.int64), [0, 1, 2], "uint8"),
        ([[0] * 3072] * 3, [0, 1, 2], "found list"),
    ],
)
def test_batch_with_wrong_dtypes_shapes_or_labels(cifar_root, data, labels, expected):
    path = batch_file(cifar_root)
    path.write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=2))
    with pytest.raises(DataFormatError, match=expected) as error:
        cifar_fit(cifar_root)
    assert str(path) in str(error.value)


# -- CIFAR-10 archive extraction --------------------------------------------------------


def extract(archive: Path, target: Path) -> None:
    target.mkdir(exist_ok=True)
    cifar10_module.safe_extract_tar(archive, target)


def assert_nothing_extracted(target: Path) -> None:
    assert list(target.iterdir()) == [], f"left behind: {list(target.iterdir())}"


GOOD_MEMBER = tar_entry("cifar-10-batches-py/data_batch_1", content=b"batch")


@pytest.mark.parametrize(
    "entry, reason",
    [
        (tar_entry("../escaped", content=b"x"), "leaves"),
        (tar_entry("cifar-10-batches-py/../../escaped", content=b"x"), "leaves"),
        (tar_entry("/tmp/lightning_hw_escaped", content=b"x"), "leaves"),
        (tar_entry("cifar-10-batches-py/test_batch", tarfile.SYMTYPE, linkname="/etc/passwd"), "not a regular file"),
        (tar_entry("cifar-10-batches-py/test_batch", tarfile.SYMTYPE, linkname="../../escaped"), "not a regular file"),
        (tar_entry("cifar-10-batches-py/test_batch", tarfile.LNKTYPE, linkname="/etc/passwd"), "not a regular file"),
        (tar_entry("cifar-10-batches-py/test_batch", tarfile.LNKTYPE, linkname="../escaped"), "not a regular file"),
        (tar_entry("cifar-10-batches-py/null", tarfile.CHRTYPE), "not a regular file"),
        (tar_entry("cifar-10-batches-py/disk", tarfile.BLKTYPE), "not a regular file"),
        (tar_entry("cifar-10-batches-py/pipe", tarfile.FIFOTYPE), "not a regular file"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-abs", "symlink-rel", "hardlink-abs", "hardlink-rel",
         "char-device", "block-device", "fifo"],  # fmt: skip
)
def test_unsafe_tar_member_is_refused_and_nothing_extracted(tmp_path, entry, reason):
    archive = tmp_path / "archive.tar.gz"
    write_tar(archive, [GOOD_MEMBER, entry])
    target = tmp_path / "out"
    with pytest.raises(DataFormatError, match=f"refusing tar member.*{reason}") as error:
        extract(archive, target)
    assert str(archive) in str(error.value) and "download it again" in str(error.value)
    assert_nothing_extracted(target)
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/lightning_hw_escaped").exists()


def test_prepare_data_refuses_unsafe_archive(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    md5 = write_tar(archive, [GOOD_MEMBER, tar_entry("../escaped", content=b"x")])
    monkeypatch.setattr(cifar10_module, "CIFAR10_ARCHIVE_MD5", md5)
    with pytest.raises(DataFormatError, match="refusing tar member '../escaped'"):
        CIFAR10DataModule(data_dir=tmp_path, download=False).prepare_data()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz", ""])
@pytest.mark.parametrize("keep", [0, 10, 0.5, 0.9], ids=lambda k: f"keep={k}")
def test_truncated_or_empty_archive_names_it_and_leaves_nothing(tmp_path, compression, keep):
    archive = tmp_path / "archive.tar"
    rng = np.random.default_rng()
    # Incompressible members, so that every cut lands inside member data or headers.
    write_tar(archive, [tar_entry(f"cifar-10-batches-py/b{i}", content=rng.bytes(30_000)) for i in range(4)], compression)
    content = archive.read_bytes()
    archive.write_bytes(content[: int(keep * len(content)) if isinstance(keep, float) else keep])  # 0.9: inside the last member
    target = tmp_path / "out"
    with pytest.raises(DataFormatError, match="not a readable tar archive") as error:
        extract(archive, target)
    assert str(archive) in str(error.value) and "download it again" in str(error.value)
    assert_nothing_extracted(target)


def test_garbage_archive_names_it(tmp_path):
    archive = tmp_path / "archive.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + np.random.default_rng().bytes(5000))  # a gzip magic, then noise
    target = tmp_path / "out"
    with pytest.raises(DataFormatError, match="not a readable tar archive"):
        extract(archive, target)
    assert_nothing_extracted(target)


def test_good_archive_merges_into_existing_folder_without_leftovers(tmp_path):
    archive = tmp_path / "archive.tar.gz"
    write_tar(archive, [tar_entry("cifar-10-batches-py", tarfile.DIRTYPE), GOOD_MEMBER])
    target = tmp_path / "out"
    (target / "cifar-10-batches-py").mkdir(parents=True)
    (target / "cifar-10-batches-py" / "test_batch").write_bytes(b"kept")
    extract(archive, target)
    assert sorted(p.name for p in target.iterdir()) == ["cifar-10-batches-py"]
    assert (target / "cifar-10-batches-py" / "data_batch_1").read_bytes() == b"batch"
    assert (target / "cifar-10-batches-py" / "test_batch").read_bytes() == b"kept"


# -- FER2013 csv -------------------------------------------------------------------------

PIXELS = " ".join(["7"] * 2304)


def fer_fit(root: Path) -> None:
    FER2013DataModule(data_dir=root).setup("fit")


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "lacks the column"),
        (b"emotion,pixels,Usage\n", "no rows for the train split"),
        (b"emotion,Usage\n0,Training\n", r"lacks the column\(s\) \['pixels'\]"),
        (f"emotion,pixels,Usage\n0,{PIXELS},Training,extra\n".encode(), "line 2: 4 fields, expected 3"),
        (f"emotion,pixels,Usage\n0,{PIXELS.replace('7', '1.5', 1)},Training\n".encode(), "line 2.*not all integers"),
        (f"emotion,pixels,Usage\n0,{PIXELS.replace('7', '0x1', 1)},Training\n".encode(), "line 2.*not all integers"),
        (f"emotion,pixels,Usage\n0,{PIXELS.replace('7', 'nan', 1)},Training\n".encode(), "line 2.*not all integers"),
        (f"emotion,pixels,Usage\n0,{PIXELS.replace('7', '-3', 1)},Training\n".encode(), "line 2.*outside 0..255"),
        (f"emotion,pixels,Usage\n0,{PIXELS.replace('7', '9' * 30, 1)},Training\n".encode(), "line 2.*outside 0..255"),
        (f"emotion,pixels,Usage\n0,{PIXELS.replace(' ', ',')},Training\n".encode(), "line 2: 2306 fields"),
        (f"emotion,pixels,Usage\n\u00b3,{PIXELS},Training\n".encode(), "line 2: emotion '\u00b3'"),
        (f"emotion,pixels,Usage\n\u0663,{PIXELS},Training\n".encode(), "line 2: emotion '\u0663'"),
        (f"emotion,pixels,Usage\n2.0,{PIXELS},Training\n".encode(), "line 2: emotion '2.0'"),
        (f"emotion,pixels,Usage\n0,{PIXELS}\0,Training\n".encode(), "line 2.*not all integers"),
        ("emotion,pixels,Usage\n0,\u00e9\u00e9,Training\n".encode("latin-1"), "not a text CSV file"),
        (b'emotion,pixels,Usage\n0,"' + b"1 " * 70_000 + b'",Training\n', "malformed CSV"),
    ],
    ids=["empty", "header-only", "missing-column", "extra-field", "float-pixel", "hex-pixel", "nan-pixel",
         "negative-pixel", "huge-pixel", "comma-pixels", "superscript-label", "arabic-digit-label", "float-label",
         "nul-byte", "latin1", "huge-field"],  # fmt: skip
)
def test_corrupt_fer2013_csv_names_the_file(tmp_path, content, expected):
    path = tmp_path / "fer2013.csv"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=expected) as error:
        fer_fit(tmp_path)
    assert str(path) in str(error.value)
    assert "Replace the file" in str(error.value) or "truncated" in str(error.value)


def test_truncated_fer2013_csv_names_the_line(tmp_path):
    path = write_fer2013_csv(tmp_path, n_per_usage=3)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])  # cut inside a Training row's pixels
    with pytest.raises(DataFormatError, match=r"fer2013\.csv, line \d+") as error:
        fer_fit(tmp_path)
    assert "Replace the file" in str(error.value)


def test_fer2013_archive_instead_of_files_says_unpack(tmp_path):
    (tmp_path / "fer2013.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataNotFoundError, match=r"Found fer2013\.tar\.gz in .*unpack it there first"):
        FER2013DataModule(data_dir=tmp_path).prepare_data()


# -- Fruits-360 image folders --------------------------------------------------------------


def png_bytes(size=(12, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng().integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def decompression_bomb_png() -> bytes:
    """A valid 1x1 PNG whose header claims 100,000 x 100,000 pixels."""
    content = bytearray(png_bytes((1, 1)))
    header = b"IHDR" + (100_000).to_bytes(4, "big") * 2 + bytes(content[24:29])
    content[12:29] = header
    content[29:33] = zlib_crc(header)
    return bytes(content)


def zlib_crc(data: bytes) -> bytes:
    import zlib

    return zlib.crc32(data).to_bytes(4, "big")


@pytest.mark.parametrize(
    "name, content",
    [
        ("text.jpg", b"this is not an image"),
        ("empty.png", b""),
        ("truncated.png", png_bytes()[:40]),
        ("truncated.jpg", jpeg_bytes()[:300]),
        ("html.jpeg", b"<html><body>404 not found</body></html>"),
        ("bomb.png", decompression_bomb_png()),
    ],
)
def test_file_that_is_not_an_image_names_its_path(tmp_path, name, content):
    write_fruits(tmp_path, n_train=4, n_test=1, size=16)
    path = tmp_path / "Training" / "Pear" / name
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match="cannot read image") as error:
        FruitsDataModule(data_dir=tmp_path, val_size=2).setup("fit")
    assert str(path) in str(error.value) and "Replace or delete the file" in str(error.value)


def test_non_files_named_like_images_are_skipped_without_hanging(tmp_path):
    write_fruits(tmp_path, n_train=4, n_test=1, size=16)
    folder = tmp_path / "Training" / "Lychee"
    os.mkfifo(folder / "pipe.jpg")  # opening it for reading would block
    (folder / "folder.png").mkdir()
    (folder / "device.jpg").symlink_to("/dev/zero")  # reading it would never end
    module = FruitsDataModule(data_dir=tmp_path, val_size=2)
    module.setup("fit")
    assert len(module.train_dataset) + len(module.val_dataset) == 3 * 4


def test_fruits_archive_instead_of_folders_says_unpack(tmp_path):
    with zipfile.ZipFile(tmp_path / "fruits-360.zip", "w") as archive:
        archive.writestr("fruits-360/Training/Pear/0_100.jpg", jpeg_bytes())
    with pytest.raises(DataNotFoundError, match=r"Found fruits-360\.zip in .*unpack it there first"):
        FruitsDataModule(data_dir=tmp_path).prepare_data()


# -- bundled digits npz -------------------------------------------------------------------------


@pytest.fixture
def digits_path(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "digits.npz"
    monkeypatch.setattr(digits_module, "DIGITS_FILE", path)
    return path


def digits_fit() -> None:
    DigitsDataModule().setup("fit")


IMAGES = np.zeros((20, 8, 8), np.uint8)
LABELS = np.arange(20) % 10


def test_npz_with_object_array_is_refused_not_unpickled(digits_path, tmp_path):
    marker = tmp_path / "side-effect"
    payload = np.empty(1, dtype=object)
    payload[0] = CallOnUnpickle(os.system, f"touch {marker}")
    np.savez(digits_path, images=payload, labels=LABELS)
    with pytest.raises(DataFormatError, match="allow_pickle") as error:
        digits_fit()
    assert str(digits_path) in str(error.value) and "reinstall lightning_hw" in str(error.value)
    assert not marker.exists()


def write_npy_header_claiming(shape) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\0" * 64


@pytest.mark.parametrize(
    "arrays, expected",
    [
        (dict(images=IMAGES), "labels"),
        (dict(images=IMAGES.astype(np.int64), labels=LABELS), "uint8 images"),
        (dict(images=IMAGES[:, :4], labels=LABELS), r"\(N, 8, 8\)"),
        (dict(images=IMAGES, labels=LABELS[:5]), "N integer labels"),
        (dict(images=IMAGES, labels=LABELS.astype(np.float32)), "float32"),
        (dict(images=IMAGES, labels=LABELS - 1), "outside 0..9"),
        (dict(images=IMAGES, labels=LABELS + 1), "outside 0..9"),
        (dict(images=IMAGES + 17, labels=LABELS), "above 16"),
    ],
    ids=["missing-key", "int64-images", "wrong-shape", "label-count", "float-labels", "negative-label",
         "label-10", "pixel-17"],  # fmt: skip
)
def test_npz_with_wrong_content(digits_path, arrays, expected):
    np.savez_compressed(digits_path, **arrays)
    with pytest.raises(DataFormatError, match=expected) as error:
        digits_fit()
    assert str(digits_path) in str(error.value) and "reinstall lightning_hw" in str(error.value)


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "npy", "pickle", "huge-header"])
def test_unreadable_npz(digits_path, kind):
    if kind == "empty":
        digits_path.write_bytes(b"")
    elif kind == "garbage":
        digits_path.write_bytes(np.random.default_rng().bytes(3000))
    elif kind == "truncated":
        np.savez_compressed(digits_path, images=IMAGES, labels=LABELS)
        digits_path.write_bytes(digits_path.read_bytes()[:200])
    elif kind == "npy":
        with open(digits_path, "wb") as file:
            np.save(file, IMAGES)
    elif kind == "pickle":
        digits_path.write_bytes(pickle.dumps({"images": IMAGES, "labels": LABELS}))
    else:
        with zipfile.ZipFile(digits_path, "w") as archive:
            archive.writestr("images.npy", write_npy_header_claiming((2**36, 8, 8)))
            archive.writestr("labels.npy", write_npy_header_claiming((2**36,)))
    with pytest.raises(DataFormatError, match="cannot read digits data file") as error:
        digits_fit()
    assert str(digits_path) in str(error.value) and "reinstall lightning_hw" in str(error.value)
