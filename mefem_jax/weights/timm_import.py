"""`import timm` on CPU-torch machines, where the registry's torchvision build does not load.

torchvision 0.28.0 from the registry is built for CUDA; next to the CPU build of torch 2.13.0 its C++
ops library fails to load, and `import torchvision` (so `import timm`) stops with "operator
torchvision::nms does not exist". timm is only needed here as the reference that exports are checked
against (tests, benchmarks, users verifying a release), so declaring the two missing op schemas is
enough: only torchvision's detection ops stay unavailable, and nothing here uses them.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

# torch and timm are imported inside the functions: they are optional (the `torch` extra) and take
# seconds to import, which no training or evaluation run should pay.
_TORCHVISION_SCHEMAS = None  # the torch.library.Library must stay alive to keep its schemas


def _torchvision_ops_missing() -> bool:
    """True when torchvision is installed but its C++ ops library does not load into this torch.

    Probes the library the way torchvision's own import does (`torch.ops.load_library`); when it
    loads, torchvision would load it anyway (dlopen is idempotent), so the probe changes nothing.
    """
    import torch
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    finder = importlib.machinery.FileFinder(
        str(Path(spec.origin).parent),
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
    ext = finder.find_spec("_C")
    if ext is None:
        return True
    try:
        torch.ops.load_library(ext.origin)
    except OSError:
        return True
    return False


def declare_torchvision_ops() -> bool:
    """Let a CUDA torchvision import under a CPU torch (docs/PLATFORM_NOTES.md); True if it had to act.

    In that pairing torchvision's C++ ops do not load and its import fails with "operator
    torchvision::nms does not exist" (its Python side registers fake kernels for those ops).
    Declaring the two op schemas first lets the import through; only torchvision's detection
    ops, which nothing here uses, stay unavailable. With a matching torchvision nothing is done.
    Call it before the first `import timm` / `import torchvision`.
    """
    global _TORCHVISION_SCHEMAS
    import torch
    if (torch.version.cuda is not None or _TORCHVISION_SCHEMAS is not None
            or "torchvision" in sys.modules or not _torchvision_ops_missing()):
        return False
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SCHEMAS = lib
    return True


def import_timm():
    """`import timm`, working on CPU-torch machines too (see `declare_torchvision_ops`)."""
    declare_torchvision_ops()
    import timm
    return timm
