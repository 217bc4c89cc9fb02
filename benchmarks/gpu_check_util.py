"""Helpers of benchmarks/gpu_check.sh: the data its fits train on, and a callback that
prints each training epoch's time.

    python benchmarks/gpu_check_util.py subset [--source ../shared/data] [--dest data/gpu_check]
        A stride subset of the real CIFAR-10 and FER2013 files, compressed, small enough to
        travel to the GPU machine (the whole sets are 142 + 75 MB xz; the tree limit is 64 MiB).
    python benchmarks/gpu_check_util.py data --work DIR [--carried data/gpu_check] [--mode auto|real|generated] [--fake-n N]
        Puts DIR/cifar10/cifar-10-batches-py/* and DIR/fer2013/fer2013.csv in place: the
        carried subset unpacked (real), or generated data in the same formats (tests/fakes.py).
        Prints one line `data: real|generated ...` that the script copies into its summary.

    --trainer.callbacks+=gpu_check_util.EpochTimer   (with benchmarks/ on PYTHONPATH)
        prints `gpu_check epoch=E train_s=S epoch_s=S images=N images_per_s=R` after each training epoch.
"""

from __future__ import annotations

import argparse
import io
import lzma
import pickle
import shutil
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = "cifar-10-batches-py.tar.xz"
FER_ARCHIVE = "fer2013.csv.xz"
CIFAR_FOLDER = "cifar-10-batches-py"


# ---------------------------------------------------------------------------
# Subset of the real data (run here, where ../shared/data is)


def _load_cifar_batch(data: bytes, name: str) -> dict:
    # The project's own restricted unpickler: the batch is data, never code.
    from lightning_hw.data.cifar10 import RestrictedUnpickler

    batch = RestrictedUnpickler(io.BytesIO(data), Path(name)).load()
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}


def subset_cifar(source: Path, dest: Path, stride: int) -> dict[str, int]:
    """Every `stride`-th image of each batch (test images 1,000+ are in class order there,
    so a stride keeps the classes balanced where a prefix would not)."""
    counts = {}
    with tarfile.open(source, "r:xz") as tar_in, tarfile.open(dest, "w:xz") as tar_out:
        for member in tar_in:
            if not member.isfile():
                continue
            name = Path(member.name).name
            content = tar_in.extractfile(member).read()
            if name.startswith("data_batch_") or name == "test_batch":
                batch = _load_cifar_batch(content, member.name)
                keep = slice(None, None, stride)
                subset = {
                    b"batch_label": batch["batch_label"],
                    b"labels": list(batch["labels"][keep]),
                    b"data": batch["data"][keep].copy(),
                    b"filenames": list(batch["filenames"][keep]),
                }
                counts[name] = len(subset[b"labels"])
                content = pickle.dumps(subset, protocol=2)
            info = tarfile.TarInfo(f"{CIFAR_FOLDER}/{name}")
            info.size = len(content)
            info.mtime = member.mtime
            tar_out.addfile(info, io.BytesIO(content))
    return counts


def subset_fer(source: Path, dest: Path, stride: int) -> dict[str, int]:
    """Every `stride`-th row of each Usage (Training, PublicTest, PrivateTest)."""
    seen: dict[str, int] = {}
    kept: dict[str, int] = {}
    with lzma.open(source, "rt", newline="") as rows, lzma.open(dest, "wt", newline="") as out:
        out.write(next(rows))  # header
        for row in rows:
            usage = row.rstrip("\r\n").rsplit(",", 1)[-1]
            index = seen.get(usage, 0)
            seen[usage] = index + 1
            if index % stride == 0:
                kept[usage] = kept.get(usage, 0) + 1
                out.write(row)
    return kept


def command_subset(args) -> int:
    source, dest = Path(args.source), Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    cifar = subset_cifar(source / CIFAR_ARCHIVE, dest / CIFAR_ARCHIVE, args.cifar_stride)
    fer = subset_fer(source / FER_ARCHIVE, dest / FER_ARCHIVE, args.fer_stride)
    cifar_train = sum(n for name, n in cifar.items() if name.startswith("data_batch_"))
    text = (
        f"summary: CIFAR-10 {cifar_train} train + {cifar.get('test_batch', 0)} test (every {args.cifar_stride}th image); "
        f"FER2013 " + ", ".join(f"{usage} {n}" for usage, n in fer.items()) + f" (every {args.fer_stride}th row)\n"
        f"Real-data subsets for benchmarks/gpu_check.sh, made by `gpu_check_util.py subset` from {source}.\n"
        f"CIFAR-10 images per batch: {cifar}\n"
    )
    (dest / "SUBSET.txt").write_text(text)
    print(text, end="")
    for path in sorted(dest.iterdir()):
        print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")
    return 0


# ---------------------------------------------------------------------------
# Data for the fits (run on the machine that trains)


def unpack_carried(carried: Path, work: Path) -> str:
    cifar_dir, fer_dir = work / "cifar10", work / "fer2013"
    cifar_dir.mkdir(parents=True, exist_ok=True)
    fer_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(carried / CIFAR_ARCHIVE, "r:xz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(f"{CIFAR_FOLDER}/")]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(cifar_dir, members=members, filter="data")
        else:  # an older Python without extraction filters: the members are our own regular files
            tar.extractall(cifar_dir, members=members)
    with lzma.open(carried / FER_ARCHIVE, "rb") as source, open(fer_dir / "fer2013.csv", "wb") as out:
        shutil.copyfileobj(source, out, length=1 << 20)
    subset = carried / "SUBSET.txt"
    lines = subset.read_text().splitlines() if subset.is_file() else []
    note = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("summary:")), "")
    return f"real subset ({note or carried})"


def generate(work: Path, n: int) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from fakes import write_cifar10, write_fer2013_csv

    write_cifar10(work / "cifar10", n_train_per_batch=n, n_test=n, seed=0)
    write_fer2013_csv(work / "fer2013", n_per_usage=n, seed=0)
    return f"generated in the real formats (tests/fakes.py): CIFAR-10 {5 * n} train / {n} test, FER2013 {n} rows per Usage"


def command_data(args) -> int:
    work, carried = Path(args.work), Path(args.carried)
    have_real = (carried / CIFAR_ARCHIVE).is_file() and (carried / FER_ARCHIVE).is_file()
    if args.mode == "real" and not have_real:
        print(f"data: real subset asked for, but {carried}/{{{CIFAR_ARCHIVE},{FER_ARCHIVE}}} are missing", file=sys.stderr)
        return 1
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    real = have_real and args.mode != "generated"
    description = unpack_carried(carried, work) if real else generate(work, args.fake_n)
    print(f"data: {'real' if real else 'generated'}: {description}")
    return 0


# ---------------------------------------------------------------------------
# Epoch timer


def _make_epoch_timer():
    import pytorch_lightning as pl
    import torch

    class EpochTimer(pl.Callback):
        """Wall time of each training epoch, the device synchronised at each end: the training
        batches alone (train_s; their images per second) and with the epoch's validation (epoch_s)."""

        def __init__(self) -> None:
            self.start = 0.0
            self.train_seconds: float | None = None
            self.images = 0

        def _now(self, pl_module: pl.LightningModule) -> float:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            return time.perf_counter()

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.images = 0
            self.train_seconds = None
            self.start = self._now(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            self.images += len(batch[0])

        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            # Lightning validates inside the training epoch, before on_train_epoch_end.
            if not trainer.sanity_checking and self.train_seconds is None and self.start:
                self.train_seconds = self._now(pl_module) - self.start

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            epoch_seconds = self._now(pl_module) - self.start
            train_seconds = self.train_seconds if self.train_seconds is not None else epoch_seconds
            rate = self.images / train_seconds if train_seconds > 0 else 0.0
            print(
                f"gpu_check epoch={trainer.current_epoch} train_s={train_seconds:.3f} epoch_s={epoch_seconds:.3f} "
                f"images={self.images} images_per_s={rate:.0f} device={pl_module.device}",
                flush=True,
            )

    EpochTimer.__qualname__ = "EpochTimer"  # so configs save it as gpu_check_util.EpochTimer
    return EpochTimer


def __getattr__(name: str):
    # EpochTimer is made on first use, so that the data commands do not import Lightning.
    if name == "EpochTimer":
        globals()["EpochTimer"] = _make_epoch_timer()
        return globals()["EpochTimer"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    subset = commands.add_parser("subset", help="real-data subsets that can travel")
    subset.add_argument("--source", default=str(ROOT.parent / "shared" / "data"))
    subset.add_argument("--dest", default=str(ROOT / "data" / "gpu_check"))
    subset.add_argument("--cifar-stride", type=int, default=5)
    subset.add_argument("--fer-stride", type=int, default=5)
    data = commands.add_parser("data", help="put the fits' data in place")
    data.add_argument("--work", required=True)
    data.add_argument("--carried", default=str(ROOT / "data" / "gpu_check"))
    data.add_argument("--mode", choices=["auto", "real", "generated"], default="auto")
    data.add_argument("--fake-n", type=int, default=1000, help="generated: images per CIFAR batch and FER Usage")
    args = parser.parse_args(argv)
    return command_subset(args) if args.command == "subset" else command_data(args)


if __name__ == "__main__":
    sys.exit(main())
