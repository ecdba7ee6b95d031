"""``Predictor``: one way to run a segmentation model for evaluation, images and video.

Normalises, runs ``whole`` or ``slide`` (overlapping crops, logits averaged over overlaps), optional
multi-scale + horizontal-flip test-time augmentation (softmax probabilities averaged over views),
batches, and returns trainId maps (and probabilities when asked). The model pads to its output stride
itself (:class:`seg.models.Segmenter`), so any image size works.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seg.checkpoint import load_checkpoint
from seg.config import Config, from_dict
from seg.data.labels import REFERENCE_NUM_CLASSES, reference_to_train
from seg.errors import UserError
from seg.models import build_model, model_from_checkpoint
from seg.nn import fold_deconv


class InferenceError(UserError, ValueError):
    """A Predictor setting or device cannot be used; the message names it and what is valid."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; otherwise the device named."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise InferenceError(f"device {device!r} is not a torch device (expected cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"device '{device}' was requested but CUDA is not available; use --device cpu")
    return device


def segmentation_model(cfg: Config) -> nn.Module:
    """The untrained segmentation model of a stored config (the ``build`` a :class:`Predictor` checkpoint needs)."""
    return build_model(cfg.model, load_pretrained=False)


def load_checkpoint_model(
    path: str | Path, device: str | torch.device = "cpu", *, build: Callable[[Config], nn.Module]
) -> tuple[nn.Module, Config]:
    """Rebuild the model from the config stored in a training checkpoint and load its weights.

    ``build`` makes the untrained model of the stored config: :func:`seg.tasks.untrained_model` for any
    task, :func:`segmentation_model` for a segmentation one. Returns ``(model in eval mode, Config)``;
    ``model.pretrained`` is not read again. A missing, unreadable or mismatching file raises
    :class:`~seg.checkpoint.CheckpointError` naming it.
    """
    state = load_checkpoint(path, map_location="cpu")
    cfg = from_dict(state["config"], source=f"{path} (stored config)")
    model = model_from_checkpoint(state, build, source=str(path))  # CheckpointError naming the file on a mismatch
    return model.to(device).eval(), cfg


def _logits_of(output: Any) -> torch.Tensor:
    if isinstance(output, dict):
        return output["out"]
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def slide_windows(
    height: int, width: int, crop: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int]]:
    """Top-left corners of crops covering an image; the last row/column is shifted to end at the border."""
    ch, cw = min(crop[0], height), min(crop[1], width)
    sh, sw = stride
    ys = list(range(0, max(height - ch, 0) + 1, sh))
    xs = list(range(0, max(width - cw, 0) + 1, sw))
    if ys[-1] + ch < height:
        ys.append(height - ch)
    if xs[-1] + cw < width:
        xs.append(width - cw)
    return [(y, x) for y in ys for x in xs]


class Predictor:
    """Runs a segmentation model on normalised tensors or raw RGB images.

    Args:
        model: returns logits (or a dict with ``'out'``) of shape N,C,H,W for any input size, as
            :class:`seg.models.Segmenter` does (it pads to its output stride and crops back).
        mean, std: normalisation of RGB values in [0, 1] (from the data config).
        mode: ``whole`` (one pass per image) or ``slide`` (crops of ``crop_size`` every ``stride``).
        scales, flip: test-time augmentation; with more than one view, probabilities are averaged.
        device: ``None`` picks CUDA when available.
        amp_dtype: autocast dtype on CUDA (e.g. ``torch.bfloat16``), ``None`` for float32.
        fold: replace deconvolution layers by equivalent plain convolutions (a copy; faster inference).
        batch_size: images (or crops) per forward pass.
        config: the training config the model was built from (set by :meth:`from_checkpoint`).

    Outputs: :meth:`probabilities` (always softmax probabilities), :meth:`logits` (raw logits; one view
    only, since views are averaged as probabilities), :meth:`predict_tensor` and ``__call__`` (trainIds).
    """

    config: Config | None

    def __init__(
        self,
        model: nn.Module,
        *,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        mode: str = "whole",
        crop_size: Sequence[int] = (1024, 1024),
        stride: Sequence[int] = (768, 768),
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        device: str | torch.device | None = None,
        amp_dtype: torch.dtype | None = None,
        fold: bool = False,
        batch_size: int = 1,
        config: Config | None = None,
    ):
        if mode not in ("whole", "slide"):
            raise InferenceError(f"eval.mode must be 'whole' or 'slide', got {mode!r}")
        if len(crop_size) != 2 or len(stride) != 2 or min(*crop_size, *stride) < 1:
            raise InferenceError(
                f"eval.crop_size and eval.stride must be two positive ints (H W), got {crop_size}, {stride}"
            )
        if not scales or min(scales) <= 0:
            raise InferenceError(f"eval.scales must be positive numbers, got {scales}")
        if batch_size < 1:
            raise InferenceError(f"eval.batch_size must be >= 1, got {batch_size}")
        self.device = pick_device(device)
        model = getattr(model, "module", model)  # DistributedDataParallel: use the wrapped module
        if fold:
            model = fold_deconv(copy.deepcopy(model))
        self.model = model.to(self.device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.mode = mode
        self.crop_size = tuple(int(v) for v in crop_size)
        self.stride = tuple(int(v) for v in stride)
        self.scales = tuple(float(s) for s in scales)
        self.flip = flip
        self.amp_dtype = amp_dtype if self.device.type == "cuda" else None
        self.batch_size = batch_size
        self.config = config
        self.num_classes = getattr(getattr(model, "config", None), "num_classes", None)

    # ------------------------------------------------------------------------------------------
    # construction from a checkpoint

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, eval_cfg: Any = None, **kwargs: Any) -> Predictor:
        """Build from a checkpoint; normalisation comes from its stored data config, the remaining
        settings from ``eval_cfg`` (an ``EvalConfig``), then from ``kwargs``. The stored training config
        is kept as :attr:`config`."""
        device = pick_device(kwargs.pop("device", None))
        model, cfg = load_checkpoint_model(path, device, build=segmentation_model)
        settings: dict[str, Any] = {"mean": cfg.data.mean, "std": cfg.data.std}
        if eval_cfg is not None:
            settings.update(
                mode=eval_cfg.mode,
                crop_size=eval_cfg.crop_size,
                stride=eval_cfg.stride,
                scales=eval_cfg.scales,
                flip=eval_cfg.flip,
                batch_size=eval_cfg.batch_size,
            )
        settings.update(kwargs)
        return cls(model, device=device, config=cfg, **settings)

    # ------------------------------------------------------------------------------------------
    # tensors in, tensors out

    @property
    def views(self) -> list[tuple[float, bool]]:
        """Test-time views as ``(scale, flipped)``; ``[(1.0, False)]`` means no augmentation."""
        return [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of any size, run in chunks of ``batch_size``."""
        outs = []
        with self._autocast():
            for chunk in x.split(self.batch_size):
                outs.append(_logits_of(self.model(chunk)).float())
        logits = torch.cat(outs)
        if logits.shape[-2:] != x.shape[-2:]:
            raise RuntimeError(
                f"model returned logits of size {tuple(logits.shape[-2:])} for input {tuple(x.shape[-2:])}; "
                "Predictor needs a model that works at any input size (e.g. seg.models.Segmenter)"
            )
        return logits

    def _slide(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
        windows = slide_windows(h, w, self.crop_size, self.stride)
        logits = None
        count = torch.zeros(1, 1, h, w, device=x.device)
        for i in range(0, len(windows), max(1, self.batch_size // n)):
            group = windows[i : i + max(1, self.batch_size // n)]
            crops = torch.cat([x[:, :, y : y + ch, x0 : x0 + cw] for y, x0 in group])
            out = self._forward(crops)
            if logits is None:
                logits = torch.zeros(n, out.shape[1], h, w, device=x.device)
            for j, (y, x0) in enumerate(group):
                logits[:, :, y : y + ch, x0 : x0 + cw] += out[j * n : (j + 1) * n]
                count[:, :, y : y + ch, x0 : x0 + cw] += 1
        return logits / count

    def _single_view(self, x: torch.Tensor) -> torch.Tensor:
        return self._slide(x) if self.mode == "slide" else self._forward(x)

    def _view_probabilities(self, x: torch.Tensor, scale: float, flipped: bool) -> torch.Tensor:
        """Softmax probabilities of one view, resized and mirrored back to the input's frame."""
        h, w = x.shape[-2:]
        if scale != 1.0:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if flipped:
            x = x.flip(-1)
        out = self._single_view(x)
        if flipped:
            out = out.flip(-1)
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out.softmax(1)

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch of images N,3,H,W, got shape {tuple(x.shape)}")
        return x.to(self.device, torch.float32)

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        # Evaluation inside training passes the training model: switch to eval and restore afterwards.
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits N,C,H,W for normalised images N,3,H,W (whole or slide; one view only).

        With test-time augmentation the views are combined as probabilities, which have no logits:
        use :meth:`probabilities` then.
        """
        if self.views != [(1.0, False)]:
            raise ValueError(
                f"Predictor.logits needs a single view, got scales {self.scales} and flip {self.flip}; "
                "test-time augmentation averages probabilities: use Predictor.probabilities"
            )
        x = self._checked(x)
        with self._eval_mode():
            return self._single_view(x)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities N,C,H,W for normalised images N,3,H,W, averaged over the TTA views."""
        x = self._checked(x)
        with self._eval_mode():
            views = self.views
            if views == [(1.0, False)]:
                return self._single_view(x).softmax(1)
            total = None
            for scale, flipped in views:
                prob = self._view_probabilities(x, scale, flipped)
                total = prob if total is None else total + prob
            return total / len(views)

    @torch.no_grad()
    def predict_tensor(self, x: torch.Tensor, return_probs: bool = False):
        """TrainId maps N,H,W (int64) of normalised images; ``return_probs`` adds N,C,H,W probabilities."""
        if self.views == [(1.0, False)] and not return_probs:
            return self.logits(x).argmax(1)  # argmax of logits = argmax of probabilities, without softmax
        probs = self.probabilities(x)
        return (probs.argmax(1), probs) if return_probs else probs.argmax(1)

    # ------------------------------------------------------------------------------------------
    # raw images in, numpy maps out

    def normalize(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 RGB H,W,3 arrays (same size) -> normalised float tensor N,3,H,W on the device."""
        arrays = []
        for i, im in enumerate(images):
            if not isinstance(im, np.ndarray) or im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                desc = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
                raise ValueError(f"image {i}: expected a uint8 RGB array H,W,3, got {desc}")
            arrays.append(torch.from_numpy(np.ascontiguousarray(im)))
        x = torch.stack(arrays).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        return (x - self.mean) / self.std

    def __call__(self, images: np.ndarray | Sequence[np.ndarray], return_probs: bool = False):
        """TrainId maps (uint8 H,W) for one RGB image or a list; images of different sizes are run separately.

        A model with the paper's 21 outputs (``data.label_mapping: reference``) has its void and unused
        predictions given as 255 (ignore; black in the palette), its classes as trainIds.

        With ``return_probs`` returns ``(maps, probs)`` where probs are float32 C,H,W arrays.
        """
        single = isinstance(images, np.ndarray) and images.ndim == 3
        batch = [images] if single else list(images)
        maps: list[np.ndarray] = [None] * len(batch)  # type: ignore[list-item]
        probs: list[np.ndarray] = [None] * len(batch)  # type: ignore[list-item]
        # Group consecutive images of the same size into batches.
        i = 0
        while i < len(batch):
            j = i + 1
            while j < len(batch) and j - i < self.batch_size and batch[j].shape == batch[i].shape:
                j += 1
            x = self.normalize(batch[i:j])
            if return_probs:
                pred, prob = self.predict_tensor(x, return_probs=True)
                for k in range(j - i):
                    probs[i + k] = prob[k].cpu().numpy()
            else:
                pred = self.predict_tensor(x)
            for k in range(j - i):
                maps[i + k] = pred[k].to(torch.uint8).cpu().numpy()
                if self.num_classes == REFERENCE_NUM_CLASSES:  # the paper's ids: void and unused become 255
                    maps[i + k] = reference_to_train(maps[i + k])
            i = j
        if single:
            return (maps[0], probs[0]) if return_probs else maps[0]
        return (maps, probs) if return_probs else maps
