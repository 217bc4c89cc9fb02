"""`python -m lightning_hw export --config RUN/config.yaml --ckpt_path CKPT [--output FILE.onnx]`:
a trained classifier as one ONNX file for deployment (phones, browsers, C++ services).

The file takes what a user has at hand, a batch of images as float32 in [0, 1], (N, C, H, W) at
the training size and channels (the batch size is free), and returns class probabilities
(N, num_classes). The checkpoint's normalisation (mean image, or per-channel mean and std,
and flattening where the data were flattened) is inside the graph: the `Normalization` that `predict` applies
to image files (lightning_hw/data/preprocessing.py). Only standard ONNX operators (the ops'
translations are lightning_hw/onnx_ops.py). Its metadata_props name the classes and say how to
read an image file into that input (channels, size, resize rule, value range), so nothing else
has to travel with it.

Before it is written, the file is checked: onnx.checker, standard operators only, and ONNX Runtime's
probabilities against PyTorch's on random images (a failure there is a bug: a RuntimeError, no file).
A user's mistake (checkpoint, config, output path, a missing package of `pip install
'lightning_hw[export]'`) is a CommandError / UsageError, reported in one line (lightning_hw.errors).
"""

from __future__ import annotations

import json
import os
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import Path_fr
from torch import nn

import lightning_hw
from lightning_hw.cli import PROGRAM, read_checkpoint, run_config_hint
from lightning_hw.data import ImageClassificationDataModule
from lightning_hw.data.images import image_reading_rule
from lightning_hw.data.preprocessing import Normalization
from lightning_hw.ensemble import config_data_arguments, load_member
from lightning_hw.errors import CommandError, UsageError, innermost_reason, parse_error_parts
from lightning_hw.models import ImageClassifier

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
# How far ONNX Runtime's probabilities may lie from PyTorch's before the file is refused.
CHECK_TOLERANCE = 1e-4


class DeployedClassifier(nn.Module):
    """What the exported file computes: images in [0, 1] -> the data's normalisation -> the model ->
    class probabilities. The same `Normalization` and `probabilities` as `predict`."""

    def __init__(self, normalization: Normalization, model: ImageClassifier) -> None:
        super().__init__()
        self.normalization = normalization
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.probabilities(self.normalization(images))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=f"{PROGRAM} export",
        description=(
            "Write a trained classifier as one ONNX file: float32 images in [0, 1] (N, C, H, W) at the training "
            "size in, the checkpoint's normalisation inside, class probabilities out; standard ONNX operators; "
            "metadata naming the classes and the input. Checked in ONNX Runtime before it is written."
        ),
        exit_on_error=False,  # a mistake is raised, and reported in one line by lightning_hw.cli.main
        allow_abbrev=False,  # as the other subcommands: `-c`/`--config` only
    )
    parser.add_argument("-c", "--config", type=Path_fr, required=True, help="The run's config.yaml: its data section is used.")
    parser.add_subclass_arguments(ImageClassificationDataModule, "data", required=False)
    parser.add_argument("--ckpt_path", type=str, required=True, help="A checkpoint written by fit.")
    parser.add_argument(
        "--output", type=str | None, default=None, help="The .onnx file to write (default: the checkpoint's path with .onnx)."
    )
    return parser


def deployed_classifier(
    model: ImageClassifier, datamodule: ImageClassificationDataModule, checkpoint: dict, checkpoint_path: Path
) -> DeployedClassifier:
    """The model behind the normalisation its checkpoint (`checkpoint`, read from `checkpoint_path`) holds in
    its DataModule state; a CommandError where checkpoint and config do not fit together."""
    trained_for = (model.num_classes, tuple(model.input_shape), list(model.class_names))
    described = (datamodule.num_classes, tuple(datamodule.input_shape), list(datamodule.class_names))
    if trained_for != described:
        raise CommandError(
            f"the checkpoint's {type(model).__name__} was trained on {trained_for[0]} classes "
            f"({', '.join(trained_for[2])}) of shape {trained_for[1]}, the config's data "
            f"({type(datamodule).__name__}) have {described[0]} ({', '.join(described[2])}) of shape {described[1]}",
            checkpoint_path,
            f"pass the config of the run that wrote it, {run_config_hint(checkpoint_path)}",
        )
    try:
        datamodule.load_state_dict(checkpoint.get(type(datamodule).__qualname__, {}))
    except ValueError as error:  # statistics of another normalisation or image shape
        raise CommandError("the checkpoint's data statistics do not fit the config", checkpoint_path, str(error)) from error
    return DeployedClassifier(datamodule.image_file_normalization(), model).eval()


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
        raise RuntimeError(f"the exported graph fails onnx.checker ({error}); the file was not written") from error
    foreign = onnx_ops.nonstandard_operators(model_proto)
    if foreign:
        raise RuntimeError(f"the exported graph holds non-standard operators ({', '.join(foreign)}); the file was not written")
    session = onnxruntime.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    largest = 0.0
    for batch in (1, 3):
        images = torch.rand(batch, *image_shape)
        with torch.no_grad():
            expected = deployed(images).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        largest = max(largest, float(abs(got - expected).max()))
    if not largest <= CHECK_TOLERANCE:
        raise RuntimeError(
            f"ONNX Runtime's probabilities differ from PyTorch's by {largest:.3g} (more than {CHECK_TOLERANCE:g}); "
            "the file was not written"
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
        raise CommandError(f"cannot write the ONNX file ({error.strerror or error})", output, "give a writable --output path") from error
    return output.stat().st_size


def human_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def export(datamodule: ImageClassificationDataModule, checkpoint_path: Path, output: Path | None = None) -> Path:
    """Export the checkpoint of a fit, with the DataModule of its run's config, as one checked ONNX file;
    print where it went and how big it is. A user's mistake is a CommandError / UsageError."""
    from lightning_hw import onnx_ops

    try:
        onnx_ops.require_export_packages()
    except ImportError as error:
        raise CommandError(str(error)) from error
    output = output or checkpoint_path.with_suffix(".onnx")
    if output.suffix.lower() != ".onnx":
        raise UsageError("--output must name a .onnx file", output, "e.g. --output model.onnx")
    checkpoint = read_checkpoint(checkpoint_path)
    model = load_member(checkpoint_path, torch.device("cpu"))
    deployed = deployed_classifier(model, datamodule, checkpoint, checkpoint_path)
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


def main(args: Sequence[str]) -> Path:
    """`python -m lightning_hw export ARGS`: the path written."""
    parser = build_parser()
    try:
        options = parser.parse_args(config_data_arguments(list(args)))
    except ArgumentError as error:
        raise UsageError(*parse_error_parts(str(error))) from error
    try:
        datamodule = parser.instantiate_classes(options).data
    except ValueError as error:  # the DataModule's own checks of the config's values
        todo = f"{innermost_reason(str(error))}; change it in the config or the option"
        raise UsageError("invalid data section", options.config, todo) from error
    output = None if options.output is None else Path(options.output)
    return export(datamodule, Path(options.ckpt_path), output)
