import numpy as np
import pytest
import torch
from fakes import collect_batches

from lightning_hw.data import DataFormatError, DigitsDataModule
from lightning_hw.data import digits as digits_module


def test_attributes_available_before_setup():
    module = DigitsDataModule()
    assert module.num_classes == 10
    assert module.class_names == [str(d) for d in range(10)]
    assert module.input_shape == (1, 8, 8)


def test_bundled_file_content():
    with np.load(digits_module.DIGITS_FILE, allow_pickle=False) as archive:
        images, labels = archive["images"], archive["labels"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.uint8
    assert images.max() == 16 and images.min() == 0
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert (digits_module.DIGITS_FILE.parent / "DIGITS_LICENSE.txt").is_file()


def test_default_split_shapes_and_ranges():
    module = DigitsDataModule(batch_size=32)
    module.prepare_data()
    module.setup(None)
    sizes = (len(module.train_dataset), len(module.val_dataset), len(module.test_dataset))
    assert sizes == (1258, 180, 359)
    x, y = next(iter(module.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    test_x, test_y = collect_batches(module.test_dataloader())
    assert 0.0 <= test_x.min() and test_x.max() <= 1.0
    assert set(test_y.tolist()) == set(range(10))


def test_splits_are_disjoint_and_cover_everything():
    module = DigitsDataModule(val_size=100, test_size=300, seed=3)
    module.setup(None)
    all_images = torch.cat([module.train_dataset.images, module.val_dataset.images, module.test_dataset.images])
    assert all_images.shape[0] == 1797
    all_labels = torch.cat([module.train_dataset.labels, module.val_dataset.labels, module.test_dataset.labels])
    stored_images, stored_labels = digits_module.load_digits_npz()
    assert torch.equal(torch.bincount(all_labels), torch.bincount(stored_labels))
    assert all_images.long().sum() == stored_images.long().sum()


def test_seeded_split_and_order():
    def test_labels(seed):
        module = DigitsDataModule(seed=seed)
        module.setup("test")
        return collect_batches(module.test_dataloader())[1]

    assert torch.equal(test_labels(0), test_labels(0))
    assert not torch.equal(test_labels(0), test_labels(1))


def test_train_epochs_shuffle_reproducibly():
    first, second = DigitsDataModule(), DigitsDataModule()
    first.setup("fit")
    second.setup("fit")
    loader = first.train_dataloader()
    epoch_1, epoch_2 = collect_batches(loader)[1], collect_batches(loader)[1]
    assert not torch.equal(epoch_1, epoch_2)
    assert torch.equal(epoch_1, collect_batches(second.train_dataloader())[1])


def test_normalisation():
    module = DigitsDataModule(normalize="per_channel", batch_size=2000)
    module.setup(None)
    x, _ = collect_batches(module.train_dataloader())
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2
    with pytest.raises(ValueError, match="normalize"):
        DigitsDataModule(normalize="zscore")


def test_bad_split_sizes():
    with pytest.raises(ValueError, match="fraction"):
        DigitsDataModule(val_size=1.5).setup("fit")
    with pytest.raises(ValueError, match="no training samples"):
        DigitsDataModule(val_size=0.6, test_size=0.5).setup("fit")


def test_damaged_bundled_file(tmp_path, monkeypatch):
    broken = tmp_path / "digits.npz"
    np.savez_compressed(broken, images=np.zeros((3, 4, 4), np.uint8), labels=np.zeros(3, np.uint8))
    monkeypatch.setattr(digits_module, "DIGITS_FILE", broken)
    with pytest.raises(DataFormatError, match="digits.npz"):
        DigitsDataModule().setup("fit")
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataFormatError, match="digits.npz"):
        DigitsDataModule().setup("fit")


def test_trains_with_lightning_trainer():
    import pytorch_lightning as pl

    class TinyClassifier(pl.LightningModule):
        def __init__(self, input_shape, num_classes):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), num_classes))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05)

    data = DigitsDataModule(batch_size=128)
    model = TinyClassifier(data.input_shape, data.num_classes)
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    assert trainer.callback_metrics["val_acc"] > 0.8
    assert data.hparams["batch_size"] == 128
