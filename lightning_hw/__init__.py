"""lightning_hw: direct conv2d and fused Linear+ReLU as PyTorch custom operators,
and the Lightning training system built on them.

Importing the package is cheap: the compiled extension is loaded by
`lightning_hw.ops` (and so by `lightning_hw.nn`) on first use.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("ops", "nn", "data", "models", "callbacks", "cli")


def has_cuda_kernels() -> bool:
    """True when the installed extension was built with its CUDA kernels."""
    from lightning_hw import ops

    return ops.has_cuda_kernels()


def __getattr__(name):
    # `import lightning_hw; lightning_hw.nn.Conv2d` works without importing
    # every submodule (and the extension) up front.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "has_cuda_kernels", *_SUBMODULES]
