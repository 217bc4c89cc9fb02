"""`python -m lightning_hw export --config RUN/config.yaml --ckpt_path CKPT [--output FILE.onnx]`:
a trained classifier as one ONNX file for deployment (phones, browsers, C++ services).

The file takes what a user has at hand, a batch of images as float32 in [0, 1], (N, C, H, W) at
the training size and channels (the batch size is free), and returns class probabilities
(N, num_classes). The checkpoint's normalisation (mean image, per-channel mean and std, the
flattening of the two-layer net) is inside the graph: the `Normalization` that `predict` applies
to image files (lightning_hw/data/preprocessing.py). Only standard ONNX operators (the ops'
translations are lightning_hw/onnx_ops.py). Its metadata_props name the classes and say how to
read an image file into that input (channels, size, resize rule, value range), so nothing else
has to travel with it.

Before it is kept, the file is checked: onnx.checker, standard operators only, and ONNX Runtime's
probabilities against PyTorch's on random images. Needs `pip install 'lightning_hw[export]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from torch import nn

import lightning_hw
from lightning_hw.data import ImageClassificationDataModule
from lightning_hw.data.images import image_reading_rule
from lightning_hw.data.preprocessing import Normalization
from lightning_hw.models import ImageClassifier

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
# How far ONNX Runtime's probabilities may lie from PyTorch's before the file is refused.
CHECK_TOLERANCE = 1e-4

# Exit statuses, as the other subcommands: 2 for a usage mistake (options, config), 1 for a
# problem with the checkpoint, the packages or the file written.
USAGE_ERROR = 2
FAILURE = 1


class ExportError(Exception):
    """What stops an export, with the exit status it ends the command with."""

    def __init__(self, message: str, status: int = FAILURE) -> None:
        super().__init__(message)
        self.status = status


class DeployedClassifier(nn.Module):
    """What the exported file computes: images in [0, 1] -> the data's normalisation -> the model ->
    class probabilities. The same `Normalization` and `probabilities` as `predict`."""

    def __init__(self, normalization: Normalization, model: ImageClassifier) -> None:
        super().__init__()
        self.normalization = normalization
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.probabilities(self.normalization(images))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_hw export",
        description=(
            "Write a trained classifier as one ONNX file: float32 images in [0, 1] (N, C, H, W) at the training "
            "size in, the checkpoint's normalisation inside, class probabilities out; standard ONNX operators; "
            "metadata naming the classes and the input. Checked in ONNX Runtime before it is kept."
        ),
    )
    parser.add_argument("-c", "--config", required=True, help="The run's config.yaml (or a shipped config's name).")
    parser.add_argument("--ckpt_path", required=True, help="A checkpoint written by fit.")
    parser.add_argument(
        "--output", default=None, help="The .onnx file to write (default: the checkpoint's path with .onnx)."
    )
    return parser


def datamodule_from_config(config_path: Path) -> ImageClassificationDataModule:
    """The DataModule of a fit config's `data` section (no data are read)."""
    from jsonargparse import ArgumentParser

    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ExportError(f"cannot read config ({config_path}): {error}; give the run's config.yaml", USAGE_ERROR) from error
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        raise ExportError(
            f"config has no data section ({config_path}): give the run's config.yaml, which fit wrote into "
            "its lightning_logs/version_N folder",
            USAGE_ERROR,
        )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ImageClassificationDataModule, "data")
    try:
        return parser.instantiate_classes(parser.parse_object({"data": data})).data
    except Exception as error:  # jsonargparse's and the DataModule's own checks
        raise ExportError(f"bad data section in config ({config_path}): {error}", USAGE_ERROR) from error


def load_checkpoint(path: Path) -> tuple[ImageClassifier, dict]:
    """(the model in eval mode on the CPU, the checkpoint's dict), read with weights_only=True."""
    from lightning_hw.ensemble import load_member

    if not path.is_file():
        raise ExportError(f"checkpoint not found ({path}): give a checkpoint written by fit, e.g. RUN/checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return load_member(path, torch.device("cpu")), checkpoint
    except Exception as error:  # truncated, not a checkpoint, not from fit, an unknown model class
        raise ExportError(
            f"cannot load checkpoint ({path}): {error}; give a checkpoint written by fit, with the run's config.yaml"
        ) from error


def deployed_classifier(
    model: ImageClassifier, datamodule: ImageClassificationDataModule, checkpoint: dict, names: tuple[Path, Path]
) -> DeployedClassifier:
    """The model behind the normalisation its checkpoint's DataModule state holds; `names` (checkpoint,
    config) for the errors."""
    checkpoint_path, config_path = names
    trained_for = (model.num_classes, tuple(model.input_shape))
    described = (datamodule.num_classes, tuple(datamodule.input_shape))
    if trained_for != described or list(model.class_names) != list(datamodule.class_names):
        raise ExportError(
            f"checkpoint and config describe different models ({checkpoint_path}: {trained_for[0]} classes "
            f"({', '.join(model.class_names)}) of shape {trained_for[1]}; {config_path}: {described[0]} classes "
            f"({', '.join(datamodule.class_names)}) of shape {described[1]}): give the run's own config.yaml"
        )
    try:
        datamodule.load_state_dict(checkpoint.get(type(datamodule).__qualname__, {}))
        normalization = datamodule.image_file_normalization()
    except (ValueError, RuntimeError) as error:
        raise ExportError(f"checkpoint and config do not fit together ({checkpoint_path}, {config_path}): {error}") from error
    return DeployedClassifier(normalization, model).eval()


def metadata(model: ImageClassifier, datamodule: ImageClassificationDataModule, checkpoint_path: Path) -> dict[str, str]:
    """The file's metadata_props: everything a user needs to feed it and read its output."""
    channels, height, width = datamodule.image_file_shape
    steps = {
        "mean_image": ["minus the training split's mean image"],
        "per_channel": ["minus the training split's per-channel mean, divided by its per-channel std"],
    }.get(datamodule.normalize, [])
    if datamodule.flatten:
        steps.append(f"flattened to (N, {channels * height * width})")
    return {
        "class_names": json.dumps(list(model.class_names)),
        "input": f"{INPUT_NAME}: float32 (N, {channels}, {height}, {width}), N free",
        "input_layout": "NCHW",
        "input_channels": str(channels),
        "input_height": str(height),
        "input_width": str(width),
        **{f"input_{key}": value for key, value in image_reading_rule((height, width), channels).items()},
        "normalization": (
            f"inside the graph: {', then '.join(steps)}; give the [0, 1] images as they are"
            if steps
            else "none: the model takes the [0, 1] images as they are"
        ),
        "output": f"{OUTPUT_NAME}: float32 (N, {model.num_classes}), softmax, one column per class_names entry",
        "model_class": type(model).__name__,
        "checkpoint": checkpoint_path.name,
        "exported_by": f"lightning_hw {lightning_hw.__version__}, torch {torch.__version__}",
    }


def export_classifier(deployed: DeployedClassifier, image_shape: Sequence[int], properties: dict[str, str]):
    """The ONNX model (an onnx.ModelProto) of `deployed`, batch size dynamic, with `properties` as its
    metadata_props."""
    from lightning_hw import onnx_ops

    # A batch of 2: torch.export specialises a size of 1.
    sample = (torch.rand(2, *image_shape),)
    options = onnx_ops.export_options(
        dynamic_shapes=onnx_ops.batch_dynamic_shapes(),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        verbose=False,
    )
    with torch.no_grad():
        program = torch.onnx.export(deployed, sample, **options)
    program.model.metadata_props.update(properties)
    program.model.doc_string = "lightning_hw image classifier: " + properties["output"]
    return program.model_proto


def check_exported(model_proto, deployed: DeployedClassifier, image_shape: Sequence[int]) -> float:
    """onnx.checker (with shape inference), standard operators only, and ONNX Runtime (CPU) against PyTorch
    on random images (batches of 1 and 3): returns the largest difference of a probability."""
    import onnx
    import onnxruntime

    from lightning_hw import onnx_ops

    try:
        onnx.checker.check_model(model_proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(
            f"the exported graph fails onnx.checker ({error}): the file was not written; please report this"
        ) from error
    foreign = onnx_ops.nonstandard_operators(model_proto)
    if foreign:
        raise ExportError(
            f"the exported graph holds non-standard operators ({', '.join(foreign)}): the file was not written; "
            "please report this"
        )
    session = onnxruntime.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    largest = 0.0
    for batch in (1, 3):
        images = torch.rand(batch, *image_shape)
        with torch.no_grad():
            expected = deployed(images).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        largest = max(largest, float(abs(got - expected).max()))
    if not largest <= CHECK_TOLERANCE:
        raise ExportError(
            f"ONNX Runtime's probabilities differ from PyTorch's by {largest:.3g} (more than {CHECK_TOLERANCE:g}): "
            "the file was not written; please report this"
        )
    return largest


def write_file(model_proto, output: Path) -> int:
    """Write the model as one file (weights inside) via a temporary file, so `output` is always whole;
    returns its size in bytes."""
    temporary = output.with_name(output.name + ".tmp")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(model_proto.SerializeToString())
        os.replace(temporary, output)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ExportError(f"cannot write the ONNX file ({output}): {error}; give a writable --output path") from error
    return output.stat().st_size


def human_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def export(config_path: Path, checkpoint_path: Path, output: Path | None = None) -> Path:
    """Export the checkpoint of a fit with its run's config as one checked ONNX file; print where and how big.

    Raises ExportError (with its exit status) for everything a user can mend.
    """
    from lightning_hw import onnx_ops

    try:
        onnx_ops.require_export_packages()
    except ImportError as error:
        raise ExportError(str(error)) from error
    output = output or checkpoint_path.with_suffix(".onnx")
    if output.suffix.lower() != ".onnx":
        raise ExportError(f"--output must name a .onnx file ({output}): e.g. --output model.onnx", USAGE_ERROR)
    datamodule = datamodule_from_config(config_path)
    model, checkpoint = load_checkpoint(checkpoint_path)
    deployed = deployed_classifier(model, datamodule, checkpoint, (checkpoint_path, config_path))
    image_shape = datamodule.image_file_shape
    model_proto = export_classifier(deployed, image_shape, metadata(model, datamodule, checkpoint_path))
    difference = check_exported(model_proto, deployed, image_shape)
    size = write_file(model_proto, output)
    channels, height, width = image_shape
    print(
        f"onnx: {output} ({human_size(size)}) | input: {INPUT_NAME} float32 (N, {channels}, {height}, {width}) in [0, 1] "
        f"| output: {OUTPUT_NAME} (N, {model.num_classes}) | ONNX Runtime vs PyTorch: {difference:.1e}"
    )
    return output


def fail(message: str, status: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def main(args: Sequence[str]) -> Path:
    """`python -m lightning_hw export ARGS`: the path written."""
    from lightning_hw.cli import resolve_config

    options = build_parser().parse_args(list(args))
    config_path = Path(resolve_config(options.config))
    try:
        return export(config_path, Path(options.ckpt_path), None if options.output is None else Path(options.output))
    except ExportError as error:
        fail(str(error), error.status)
