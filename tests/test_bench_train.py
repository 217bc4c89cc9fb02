"""benchmarks/bench_train.py (issue 13): its torch.nn twins compute what our models
do, and a tiny run prints a row per model."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lightning_hw.nn as lnn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as for `python benchmarks/bench_train.py`: it imports bench_ops
try:
    import bench_train
finally:
    sys.path.remove(str(BENCHMARKS))

MODELS = list(bench_train.WORKLOADS)


def assert_close_to_scale(actual, expected):
    """Equal to float64 rounding relative to the tensor's largest entry: a fixed atol
    would pass anything for TwoLayerNet, whose weights start at N(0, 1e-8)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-9 * expected.abs().max().item())


@pytest.mark.parametrize("name", MODELS)
def test_torch_twin_has_the_same_outputs_and_gradients(name):
    torch.manual_seed(0)
    ours = bench_train.WORKLOADS[name].build().double().eval()
    twin = bench_train.torch_twin(ours)
    assert not any(isinstance(m, (lnn.Conv2d, lnn.LinearReLU)) for m in twin.modules())
    assert any(isinstance(m, (lnn.Conv2d, lnn.LinearReLU)) for m in ours.modules())  # a copy: ours untouched

    images = torch.rand(3, *ours.input_shape, dtype=torch.float64)
    labels = torch.randint(0, ours.num_classes, (3,))
    outputs = []
    for model in (ours, twin):
        logits = model(images)
        F.cross_entropy(logits, labels).backward()
        outputs.append(logits)
    assert_close_to_scale(outputs[1], outputs[0])
    # The swaps keep each module's place, so the parameters come in the same order (the names
    # differ: a LinearReLU's weight is its Sequential twin's 0.weight).
    ours_parameters, twin_parameters = list(ours.parameters()), list(twin.parameters())
    assert len(ours_parameters) == len(twin_parameters)
    for mine, its in zip(ours_parameters, twin_parameters):
        assert mine is not its  # the twin trains its own copy
        torch.testing.assert_close(its, mine, rtol=0, atol=0)
        assert_close_to_scale(its.grad, mine.grad)


def test_torch_twin_refuses_a_subclass_it_cannot_copy():
    class ShiftedConv(lnn.Conv2d):
        pass

    with pytest.raises(TypeError, match="ShiftedConv"):
        bench_train.torch_twin(torch.nn.Sequential(ShiftedConv(1, 2, 3)))


@pytest.mark.parametrize("model", [*MODELS, "all"])
def test_tiny_run_prints_a_row_per_model(model, capsys):
    bench_train.main(["--model", model, "--images", "8", "--rounds", "1", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    flags = " ".join(bench_train.cpu_flags())
    assert lines[0].startswith(
        f"# torch {torch.__version__}, {bench_train.cpu_model()} ({flags}), 1 threads; precision 32;"
    )
    header = "| model | images | batch | torch.nn s/epoch | ours s/epoch | x torch.nn |"
    table = lines[lines.index(header) + 2 :]
    expected = MODELS if model == "all" else [model]
    batch = {name: bench_train.WORKLOADS[name].batch_size for name in expected}
    assert [row.split(" | ")[:3] for row in table[: len(expected)]] == [
        [f"| {name}", "8", str(batch[name])] for name in expected
    ]
    report_rows = [line for line in lines if line.startswith(("| torch.nn |", "| lightning_hw |"))]
    assert len(report_rows) == (2 if "fruit" in expected else 0)


def test_bf16_mixed_epochs_run_both_models_in_bfloat16(capsys):
    torch.manual_seed(0)
    ours = bench_train.WORKLOADS["fruit"].build()
    twin = bench_train.torch_twin(ours)
    seen = {}
    for name, model in (("ours", ours), ("torch.nn", twin)):
        model.conv.register_forward_hook(lambda module, args, out, name=name: seen.update({name: out.dtype}))
    batches = bench_train.make_batches(4, 2, ours.input_shape, ours.num_classes, seed=0)
    bench_train.median_times({"ours": ours, "torch.nn": twin}, batches, 1, 0.01, True, torch.bfloat16)
    assert seen == {"ours": torch.bfloat16, "torch.nn": torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    bench_train.main(["--model", "fruit", "--images", "4", "--rounds", "1", "--precision", "bf16-mixed"])
    assert "precision bf16-mixed;" in capsys.readouterr().out.splitlines()[0]


def test_a_last_batch_of_one_image_is_refused_for_batch_norm(capsys):
    with pytest.raises(SystemExit):
        bench_train.main(["--model", "emotion", "--images", "9", "--batch-size", "4", "--rounds", "1"])
    assert "leave a last batch of one image" in capsys.readouterr().err
