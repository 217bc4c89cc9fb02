"""`python -m lightning_hw export`: one ONNX file per checkpoint that takes images in [0, 1], holds the
checkpoint's normalisation and gives class probabilities. Checked in ONNX Runtime (CPU) against PyTorch
in eval mode for every shipped config's model on generated data; the README's onnxruntime-only script
against `predict` on a folder of photos; the metadata; and every mistake a user can make."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fakes import printed_by, write_photo_folder  # noqa: E402
from lightning_hw import onnx_ops  # noqa: E402
from lightning_hw.cli import CONFIG_DIR, LightningHWCLI, main, shipped_configs  # noqa: E402
from lightning_hw.data import CIFAR10DataModule, ImageClassificationDataModule  # noqa: E402
from lightning_hw.export import (  # noqa: E402
    INPUT_NAME,
    OUTPUT_NAME,
    DeployedClassifier,
    export_classifier,
    human_size,
    metadata,
)
from lightning_hw.models import ImageClassifier, TwoLayerNet  # noqa: E402
from lightning_hw.models.transfer import TIMM_BACKBONES, import_timm, import_torchvision  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
TOLERANCE = 1e-4
BATCH_SIZES = (1, 7)
CLASS_NAMES = list(CIFAR10DataModule().class_names)


def failure(args: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of a command that must fail without a traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(args)
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return stopped.value.code, error


def session_of(model_proto) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def assert_probabilities_match(session, reference, image_shape) -> None:
    """ONNX Runtime's probabilities equal `reference(images)` within TOLERANCE for batches of 1 and 7 of
    random images in [0, 1]; and they tell images apart (a comparison of near-uniform outputs proves little)."""
    for batch in BATCH_SIZES:
        # Noise at a brightness of its own per image: a deep random network averages plain noise away.
        images = torch.rand(batch, 1, 1, 1) * torch.rand(batch, *image_shape)
        with torch.no_grad():
            expected = reference(images).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0, err_msg=f"batch {batch}")
    spread = np.abs(expected - expected.mean(axis=0)).max()
    assert spread > 100 * TOLERANCE, f"probabilities hardly depend on the image (spread {spread:.2g})"


# -- every shipped config's model ----------------------------------------------------------------


def backbone_missing(config: str) -> str | None:
    """Why the config's model cannot be built here (a TransferNet without timm or torchvision), or None."""
    text = (CONFIG_DIR / f"{config}.yaml").read_text()
    if "TransferNet" not in text:
        return None
    try:
        if any(name in text for name in TIMM_BACKBONES):
            import_timm()
        else:
            import_torchvision()
    except ImportError as error:
        return str(error)
    return None




def model_and_data(config: str, root: Path) -> tuple[ImageClassifier, ImageClassificationDataModule]:
    """The config's model (random weights, random batch-norm statistics) and DataModule (random
    normalisation statistics, as a checkpoint would restore), built as `fit` builds them."""
    args = ["--config", str(CONFIG_DIR / f"{config}.yaml"), f"--trainer.default_root_dir={root}",
            "--trainer.logger=false"]  # fmt: skip
    if "TransferNet" in (CONFIG_DIR / f"{config}.yaml").read_text():
        args.append("--model.init_args.pretrained=false")
    cli = LightningHWCLI(ImageClassifier, ImageClassificationDataModule, subclass_mode_model=True,
                         subclass_mode_data=True, auto_configure_optimizers=False, run=False, args=args)  # fmt: skip
    model, datamodule = cli.model.eval(), cli.datamodule
    if datamodule.normalize != "none":
        shape = (datamodule.image_file_shape if datamodule.normalize == "mean_image"
                 else (datamodule.image_file_shape[0], 1, 1))  # fmt: skip
        datamodule.load_state_dict({"normalize": datamodule.normalize, "mean": torch.rand(shape),
                                    "std": torch.rand(shape) + 0.5 if datamodule.normalize == "per_channel" else None})  # fmt: skip
    normalization = datamodule.image_file_normalization()

    def random_images(count: int) -> torch.Tensor:
        return normalization(torch.rand(count, 1, 1, 1) * torch.rand(count, *datamodule.image_file_shape))

    # Random networks give nearly uniform probabilities, where a comparison proves little. Batch norm
    # gets the statistics of random images (its defaults let a deep net's signal die out), and the last
    # layer is scaled so that the logits spread (std 2).
    batch_norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    classifier = [module for module in model.modules() if isinstance(module, nn.Linear)][-1]
    with torch.no_grad():
        for module in batch_norms:
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches seen
            module.train()
        model(random_images(16))
        for module in batch_norms:
            module.eval()
        scale = 2.0 / model(random_images(8)).std()
        classifier.weight *= scale
        if classifier.bias is not None:
            classifier.bias *= scale
    return model, datamodule


# Fit configs whose model is not exported below, and why.
NOT_EXPORTED_HERE = {
    # TransferNet's code is cifar10_transfer_lite0's; a torchvision ResNet50 holds nothing of ours that the
    # other models and tests/test_onnx_ops.py do not, and its export alone takes half a minute.
    "cifar10_transfer": "TransferNet with torchvision's ResNet50",
}
# Every other fit config the package ships (a sweep's config names one of these).
SHIPPED_MODELS = [
    name for name in shipped_configs() if not name.startswith("sweeps/") and name not in NOT_EXPORTED_HERE
]


@pytest.mark.parametrize("config", SHIPPED_MODELS)
def test_each_shipped_configs_model_runs_in_onnxruntime_as_in_pytorch(config, tmp_path):
    missing = backbone_missing(config)
    if missing:
        pytest.skip(missing)
    model, datamodule = model_and_data(config, tmp_path)
    image_shape = datamodule.image_file_shape
    deployed = DeployedClassifier(datamodule.image_file_normalization(), model)
    model_proto = export_classifier(deployed, image_shape, metadata(model, datamodule, Path("x.ckpt")))
    onnx.checker.check_model(model_proto, full_check=True)
    assert onnx_ops.nonstandard_operators(model_proto) == []
    assert model_proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch is free

    # PyTorch in eval mode with the normalisation written out here, not the module the graph holds.
    mean, std = datamodule._restored_statistics or (None, None)

    def reference(images: torch.Tensor) -> torch.Tensor:
        if mean is not None:
            images = images - mean
        if std is not None:
            images = images / std
        if datamodule.flatten:
            images = images.reshape(len(images), -1)
        return torch.softmax(model(images), dim=1)

    assert_probabilities_match(session_of(model_proto), reference, image_shape)


# -- the command, from a fit's checkpoint --------------------------------------------------------


def test_export_writes_one_checked_file_with_the_normalisation_inside(cifar_run, tmp_path):
    run_dir, checkpoint, _ = cifar_run
    path = tmp_path / "deploy" / "cifar.onnx"
    printed = printed_by(["export", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(checkpoint),
                   "--output", str(path)])  # fmt: skip
    line = printed.strip().splitlines()[-1]
    assert line.startswith(f"onnx: {path} (")
    assert "input: images float32 (N, 3, 32, 32) in [0, 1]" in line and "output: probabilities (N, 10)" in line
    assert f"({human_size(path.stat().st_size)})" in line
    assert [file.name for file in path.parent.iterdir()] == ["cifar.onnx"]  # one file, the weights inside

    model_proto = onnx.load(path)
    onnx.checker.check_model(model_proto, full_check=True)
    assert onnx_ops.nonstandard_operators(model_proto) == []
    (given,) = model_proto.graph.input
    dims = given.type.tensor_type.shape.dim
    assert given.name == "images" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [output.name for output in model_proto.graph.output] == ["probabilities"]
    props = {prop.key: prop.value for prop in model_proto.metadata_props}
    assert json.loads(props["class_names"]) == CLASS_NAMES
    assert (props["input_channels"], props["input_height"], props["input_width"]) == ("3", "32", "32")
    assert props["input_layout"] == "NCHW" and "[0, 1]" in props["input_value_range"]
    assert "32x32" in props["input_resize"] and "BILINEAR" in props["input_resize"]
    assert "mean image" in props["normalization"]
    assert props["model_class"] == "TwoLayerNet"

    # Against the model and statistics of the checkpoint, the preprocessing written out by hand.
    model = TwoLayerNet.load_from_checkpoint(checkpoint, weights_only=True).eval()
    mean = torch.load(checkpoint, weights_only=True)["CIFAR10DataModule"]["mean"]
    assert_probabilities_match(
        session_of(model_proto), lambda images: torch.softmax(model((images - mean).flatten(1)), 1), (3, 32, 32)
    )


def readme_script() -> str:
    """The onnxruntime-only script of the README's Deploying section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Deploying") :]
    start = section.index("    # classify_onnx.py")
    lines = []
    for line in section[start:].splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip() + "\n"


def test_readme_script_classifies_a_folder_as_predict_does(cifar_run, tmp_path):
    run_dir, checkpoint, _ = cifar_run
    folder = tmp_path / "photos"
    readable = write_photo_folder(folder, np.random.default_rng())  # several formats, modes and sizes
    with pytest.warns(UserWarning, match="skipped"):
        printed = printed_by(["predict", "--config", str(run_dir / "config.yaml"), f"--ckpt_path={checkpoint}",
                       f"--data.predict_dir={folder}", f"--trainer.default_root_dir={tmp_path / 'out'}", *QUIET])  # fmt: skip
    table = next(line for line in printed.splitlines() if line.startswith("predictions:")).rsplit(" written to ", 1)[1]
    predicted = {row["path"]: row for row in csv.DictReader(open(table)) if row["status"] == "predicted"}
    assert set(predicted) == set(readable)

    model_path = tmp_path / "cifar.onnx"
    printed_by(["export", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(checkpoint), "--output", str(model_path)])
    script = tmp_path / "classify_onnx.py"
    script.write_text(readme_script())
    # A fresh interpreter that cannot import lightning_hw: the script stands on onnxruntime, Pillow and numpy.
    result = subprocess.run([sys.executable, "-I", str(script), str(model_path), str(folder)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for bad in ("broken.png", "holiday/truncated.jpg", "pipe.png"):
        assert f"skipped {bad}:" in result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["path"] for row in rows] == sorted(readable)
    columns = [f"prob_{name}" for name in CLASS_NAMES]
    for row in rows:
        expected = predicted[row["path"]]
        assert row["class_name"] == expected["class_name"], row["path"]
        got = np.array([float(row[column]) for column in columns])
        np.testing.assert_allclose(got, [float(expected[column]) for column in columns], atol=TOLERANCE, rtol=0,
                                   err_msg=row["path"])  # fmt: skip


def test_export_defaults_to_the_checkpoints_name(cifar_run, tmp_path):
    run_dir, checkpoint, _ = cifar_run
    copied = tmp_path / "best.ckpt"
    copied.write_bytes(checkpoint.read_bytes())
    printed = printed_by(["export", "-c", str(run_dir / "config.yaml"), "--ckpt_path", str(copied)])
    assert (tmp_path / "best.onnx").is_file() and f"onnx: {tmp_path / 'best.onnx'} (" in printed


# -- mistakes ------------------------------------------------------------------------------------


def test_export_errors_name_the_file_and_what_to_do(cifar_run, tmp_path, capsys):
    run_dir, checkpoint, _ = cifar_run
    config = str(run_dir / "config.yaml")
    output = ["--output", str(tmp_path / "never.onnx")]

    status, error = failure(["export", "--config", config, "--ckpt_path", str(tmp_path / "gone.ckpt"), *output], capsys)
    assert status == 1 and re.match(r"error: checkpoint not found \(.*gone\.ckpt\): ", error)

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    status, error = failure(["export", "--config", config, "--ckpt_path", str(truncated), *output], capsys)
    assert status == 1 and "cannot read the checkpoint" in error and str(truncated) in error

    stripped = torch.load(checkpoint, weights_only=True)
    del stripped["CIFAR10DataModule"]  # as a checkpoint written before DataModules kept their statistics
    torch.save(stripped, tmp_path / "old.ckpt")
    status, error = failure(["export", "--config", config, "--ckpt_path", str(tmp_path / "old.ckpt"), *output], capsys)
    assert status == 1 and "needs the train split's statistics" in error

    # A config of another model: the digits CNN's default.yaml. The error names the run's own config.
    status, error = failure(["export", "--config", "default", "--ckpt_path", str(checkpoint), *output], capsys)
    assert status == 1 and "DigitsDataModule" in error and f"-c {run_dir / 'config.yaml'}" in error

    no_data = tmp_path / "no_data.yaml"
    no_data.write_text("trainer:\n  max_epochs: 1\n")
    status, error = failure(["export", "--config", str(no_data), "--ckpt_path", str(checkpoint), *output], capsys)
    assert status == 2 and f"the config has no data section ({no_data})" in error

    bad_data = tmp_path / "bad_data.yaml"
    bad_data.write_text("data:\n  class_path: lightning_hw.data.CIFAR10DataModule\n  init_args:\n    normalize: sideways\n")
    status, error = failure(["export", "--config", str(bad_data), "--ckpt_path", str(checkpoint), *output], capsys)
    assert status == 2 and f"invalid data section ({bad_data})" in error and "sideways" in error

    status, error = failure(["export", "--config", str(tmp_path / "absent.yaml"), "--ckpt_path", str(checkpoint)], capsys)
    assert status == 2 and "absent.yaml" in error

    status, error = failure(["export", "--config", config], capsys)  # no --ckpt_path
    assert status == 2 and "required: ckpt_path" in error

    status, error = failure(["export", "--config", config, "--ckpt_path", str(checkpoint), "--output", "x.txt"], capsys)
    assert status == 2 and "--output must name a .onnx file (x.txt)" in error
    assert not (tmp_path / "never.onnx").exists()


def test_export_names_a_missing_package(cifar_run, monkeypatch, capsys):
    import importlib.util

    run_dir, checkpoint, _ = cifar_run
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "onnxruntime" else real_find_spec(name, *rest))  # fmt: skip
    status, error = failure(["export", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(checkpoint)], capsys)
    assert status == 1
    assert error.startswith("error: ") and "onnxruntime" in error and "pip install 'lightning_hw[export]'" in error


def test_export_is_in_the_help(capsys):
    main(["--help"])
    assert "  export " in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        main(["export", "--help"])
    assert stopped.value.code == 0
    assert "--ckpt_path" in capsys.readouterr().out
