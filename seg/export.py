"""Export a trained model (deconvolution folded into plain convolutions) to TorchScript or ONNX.

The exported graph takes a normalised image batch N,3,H,W of any size and returns logits N,C,H,W: it
always pads to the output stride and crops back, so the padding is part of the graph rather than a
Python branch frozen at tracing time.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("torchscript", "onnx")
ONNX_HELP = (
    "ONNX export needs the optional packages onnx, onnxruntime and onnxscript: pip install -e '.[onnx]'"
)


class ExportError(RuntimeError):
    """The export failed or its output does not match the eager model; the message says which."""


class ExportModel(nn.Module):
    """Wraps a segmentation model for export: logits tensor out, padding done unconditionally."""

    def __init__(self, model: nn.Module, size_divisor: int):
        super().__init__()
        self.model = model
        self.size_divisor = int(size_divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        d = self.size_divisor
        x = F.pad(x, [0, (d - w % d) % d, 0, (d - h % d) % d])
        out = self.model(x)
        out = out["out"] if isinstance(out, dict) else out
        return out[:, :, :h, :w]


def prepare(model: nn.Module) -> ExportModel:
    """An eval-mode copy with deconvolution folded, wrapped for export."""
    from seg.nn import fold_deconv

    model = fold_deconv(copy.deepcopy(model)).eval()
    divisor = getattr(model, "size_divisor", None) or getattr(
        getattr(model, "config", None), "output_stride", 8
    )
    return ExportModel(model, divisor).eval()


def export_torchscript(wrapped: ExportModel, sample: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # Tracing is deprecated upstream but still the one dependency-free, loadable-from-C++ format; the
        # shape checks it warns about are what ExportModel makes unconditional.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapped, sample, check_trace=False)
    traced.save(str(path))
    return path


def run_torchscript(path: str | Path, x: torch.Tensor) -> torch.Tensor:
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
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (sample,), str(path), **kwargs)
    return path, False


def run_onnx(path: str | Path, x: torch.Tensor) -> torch.Tensor:
    _require_onnx()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})
    return torch.from_numpy(out)


def compare(wrapped: ExportModel, run, path: Path, inputs: list[torch.Tensor]) -> float:
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
