"""Export a trained model (deconvolution folded into plain convolutions) to TorchScript or ONNX.

The exported graph takes a normalised image batch N,3,H,W of any size and returns logits N,C,H,W: the
model pads to its output stride unconditionally (:func:`seg.models.segmenter.pad_to_multiple`) and crops
back, so the padding is part of the graph rather than a Python branch frozen at tracing time.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from seg.errors import UserError
from seg.nn import fold_deconv

FORMATS = ("torchscript", "onnx")
ONNX_HELP = (
    "ONNX export needs the optional packages onnx, onnxruntime and onnxscript: pip install -e '.[onnx]'"
)


class ExportError(UserError, RuntimeError):
    """The export failed or its output does not match the eager model; the message says which."""


class ExportModel(nn.Module):
    """Wraps a segmentation model for export: a logits tensor out instead of a dict."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out["out"] if isinstance(out, dict) else out


def prepare(model: nn.Module) -> ExportModel:
    """An eval-mode copy with deconvolution folded, wrapped for export."""
    return ExportModel(fold_deconv(copy.deepcopy(model)).eval()).eval()


def export_torchscript(wrapped: ExportModel, sample: torch.Tensor, path: str | Path) -> Path:
    """Trace ``wrapped`` on ``sample`` and save it; the file accepts any N, H, W."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # Tracing is deprecated upstream but still the one dependency-free, loadable-from-C++ format; the
        # model pads and resizes unconditionally, so no shape-dependent branch is frozen.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapped, sample, check_trace=False)
    try:
        traced.save(str(path))
    except RuntimeError as e:  # torch reports an unwritable file as a RuntimeError
        raise ExportError(f"cannot write {path}: {e}") from e
    return path


def run_torchscript(path: str | Path, x: torch.Tensor) -> torch.Tensor:
    """Logits of a saved TorchScript file on CPU."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu")(x)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"{ONNX_HELP} (missing: {e.name})") from None


def export_onnx(
    wrapped: ExportModel, sample: torch.Tensor, path: str | Path, dynamic: bool = True
) -> tuple[Path, bool]:
    """Write an ONNX file; returns (path, whether height/width are dynamic)."""
    _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(input_names=["image"], output_names=["logits"], dynamo=True, external_data=False)
    if dynamic:
        dim = torch.export.Dim.DYNAMIC
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapped, (sample,), str(path), dynamic_shapes=({0: dim, 2: dim, 3: dim},), **kwargs
                )
            return path, True
        except Exception as e:  # the exporter raises many types; fall back to a fixed input size
            warnings.warn(
                f"dynamic-shape ONNX export failed ({type(e).__name__}); exporting at a fixed size",
                stacklevel=2,
            )
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (sample,), str(path), **kwargs)
    except Exception as e:  # an operator without an ONNX translation, an exporter bug, a write error
        raise ExportError(f"ONNX export to {path} failed: {type(e).__name__}: {e}") from e
    return path, False


def run_onnx(path: str | Path, x: torch.Tensor) -> torch.Tensor:
    """Logits of an ONNX file with onnxruntime on CPU."""
    _require_onnx()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})
    return torch.from_numpy(out)


def compare(
    wrapped: ExportModel,
    run: Callable[[Path, torch.Tensor], torch.Tensor],
    path: Path,
    inputs: list[torch.Tensor],
) -> float:
    """Largest absolute difference between the exported file and the eager model over ``inputs``."""
    diff = 0.0
    for x in inputs:
        with torch.no_grad():
            ref = wrapped(x)
        got = run(path, x)
        if got.shape != ref.shape:
            raise ExportError(
                f"{path}: output shape {tuple(got.shape)} for input {tuple(x.shape)}, "
                f"expected {tuple(ref.shape)}"
            )
        diff = max(diff, float((got.float() - ref.float()).abs().max()))
    return diff
