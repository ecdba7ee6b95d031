"""Bridge to the official Cityscapes evaluator (``cityscapesscripts``), run in-process.

Predictions are written as full-resolution labelId PNGs named ``<city>_<seq>_<frame>_leftImg8bit.png``
(the name of the input image, the form the Cityscapes test server and evaluator expect). The evaluator
module reads ``CITYSCAPES_DATASET`` at import, calls ``sys.exit`` on any error and uses ``np.in1d``
(removed in NumPy 2.4); :func:`run_official_eval` gives it its settings explicitly, turns its exits into
:class:`OfficialEvalError` and supplies ``np.in1d`` only for the duration of the call.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from seg.data.labels import train_to_label
from seg.errors import UserError
from seg.media import write_image

_CORE_NAME = re.compile(r"^(?P<city>[^_]+)_(?P<seq>\d+)_(?P<frame>\d+)(?:_|\.|$)")


class OfficialEvalError(UserError, RuntimeError):
    """The official evaluator cannot run on its input (missing ground truth or predictions, a file name
    that is not a Cityscapes name) or rejected it; the message names the file, or is the evaluator's own."""


def core_name(path: str | Path) -> str:
    """``<city>_<seq>_<frame>`` of a Cityscapes file name (image, ground truth or prediction)."""
    m = _CORE_NAME.match(Path(path).name)
    if m is None:
        raise OfficialEvalError(
            f"{path}: not a Cityscapes file name (expected <city>_<seq>_<frame>_..., e.g. "
            "aachen_000000_000019_leftImg8bit.png)"
        )
    return f"{m['city']}_{m['seq']}_{m['frame']}"


def prediction_path(out_dir: str | Path, image_path: str | Path) -> Path:
    """Path of the labelId prediction of ``image_path``: ``out_dir/<city>_<seq>_<frame>_leftImg8bit.png``."""
    return Path(out_dir) / f"{core_name(image_path)}_leftImg8bit.png"


def save_label_ids(trainids: np.ndarray, path: str | Path) -> Path:
    """Write a trainId map as a single-channel uint8 labelId PNG, the official evaluator's input format."""
    return write_image(path, train_to_label(np.asarray(trainids)).astype(np.uint8))


def ground_truth_files(root: str | Path, split: str = "val") -> list[Path]:
    """The labelId ground-truth PNGs of ``split``, sorted; none is an :class:`OfficialEvalError`."""
    pattern = Path(root, "gtFine", split, "*", "*_gtFine_labelIds.png")
    files = sorted(Path(root, "gtFine", split).glob("*/*_gtFine_labelIds.png"))
    if not files:
        raise OfficialEvalError(f"no ground truth for the official evaluator: nothing matches {pattern}")
    return files


@contextlib.contextmanager
def _numpy_in1d() -> Iterator[None]:
    """Provide ``np.in1d`` (removed in NumPy 2.4) while the evaluator runs; leaves NumPy as it was."""
    if hasattr(np, "in1d"):
        yield
        return

    def in1d(ar1: Any, ar2: Any, assume_unique: bool = False, invert: bool = False) -> np.ndarray:
        return np.isin(np.asarray(ar1).ravel(), ar2, assume_unique=assume_unique, invert=invert)

    np.in1d = in1d  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del np.in1d  # type: ignore[attr-defined]


def _import_evaluator(root: Path) -> Any:
    # The module computes default paths from CITYSCAPES_DATASET when first imported; give it ours so its
    # defaults point somewhere sensible, then override every setting explicitly on a private copy.
    old = os.environ.get("CITYSCAPES_DATASET")
    os.environ["CITYSCAPES_DATASET"] = str(root)
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
    finally:
        if old is None:
            os.environ.pop("CITYSCAPES_DATASET", None)
        else:
            os.environ["CITYSCAPES_DATASET"] = old
    return cs_eval


def run_official_eval(
    pred_dir: str | Path,
    root: str | Path,
    split: str = "val",
    instance_level: bool | None = None,
    json_out: str | Path | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Score the labelId PNGs in ``pred_dir`` against ``root/gtFine/<split>`` with cityscapesscripts.

    Every ground-truth image needs exactly one prediction ``<city>_<seq>_<frame>*.png`` (searched
    recursively). ``instance_level`` (default: when every ``*_gtFine_instanceIds.png`` exists) adds iIoU.
    Returns class/category IoU dicts and their averages (fractions, NaN for classes absent everywhere).
    """
    root, pred_dir = Path(root), Path(pred_dir)
    gts = ground_truth_files(root, split)
    preds_by_core: dict[str, Path] = {}
    for p in sorted(pred_dir.rglob("*.png")):
        key = core_name(p)
        if key in preds_by_core:
            raise OfficialEvalError(f"two predictions for {key}: {preds_by_core[key]} and {p}")
        preds_by_core[key] = p
    missing = [g for g in gts if core_name(g) not in preds_by_core]
    if missing:
        raise OfficialEvalError(
            f"{len(missing)} ground-truth images have no prediction in {pred_dir}, e.g. {missing[0]}"
        )
    preds = [preds_by_core[core_name(g)] for g in gts]
    if instance_level is None:
        instance_level = all(Path(str(g).replace("labelIds", "instanceIds")).is_file() for g in gts)

    cs_eval = _import_evaluator(root)
    args = copy.copy(cs_eval.args)  # module-level settings object; never mutate the shared one
    args.cityscapesPath = str(root)
    args.groundTruthSearch = str(root / "gtFine" / split / "*" / "*_gtFine_labelIds.png")
    args.predictionPath = str(pred_dir)
    args.predictionWalk = None
    args.evalInstLevelScore = bool(instance_level)
    args.evalPixelAccuracy = False
    args.JSONOutput = json_out is not None
    args.exportFile = str(json_out) if json_out is not None else ""
    args.quiet = not verbose
    args.colorized = False
    args.bold = args.nocol = ""

    captured = io.StringIO()
    try:
        with _numpy_in1d(), contextlib.redirect_stdout(captured if not verbose else _Tee(captured)):
            result = cs_eval.evaluateImgLists([str(p) for p in preds], [str(g) for g in gts], args)
    except SystemExit as e:
        errors = [line for line in captured.getvalue().splitlines() if line.startswith("ERROR")]
        msg = errors[-1] if errors else f"exit status {e.code}"
        raise OfficialEvalError(f"cityscapesscripts evaluator failed: {msg}") from None

    out = {
        "miou": result["averageScoreClasses"],
        "class_iou": result["classScores"],
        "category_miou": result["averageScoreCategories"],
        "category_iou": result["categoryScores"],
        "num_images": len(gts),
    }
    if instance_level:
        out.update(
            iiou=result["averageScoreInstClasses"],
            class_iiou=result["classInstScores"],
            category_iiou=result["averageScoreInstCategories"],
            category_iiou_scores=result["categoryInstScores"],
        )
    # Only the 19 evaluated classes carry a score; the rest are NaN by construction.
    out["class_iou"] = {k: v for k, v in out["class_iou"].items() if not _ignored_in_eval(k)}
    if "class_iiou" in out:
        out["class_iiou"] = {k: v for k, v in out["class_iiou"].items() if not _ignored_in_eval(k)}
    return out


def _ignored_in_eval(name: str) -> bool:
    from cityscapesscripts.helpers.labels import name2label

    return name2label[name].ignoreInEval


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy (so errors can be quoted in verbose mode too)."""

    def __init__(self, copy_to: io.StringIO):
        self._copy = copy_to
        self._out = sys.stdout

    def write(self, s: str) -> int:
        self._copy.write(s)
        return self._out.write(s)

    def flush(self) -> None:
        self._out.flush()


def format_official(result: dict[str, Any]) -> str:
    """A short report: class and category scores (percent) from :func:`run_official_eval`."""

    def pct(v: float) -> str:
        return "   n/a" if v != v else f"{100 * v:6.2f}"

    has_inst = "class_iiou" in result
    lines = [
        "cityscapesscripts (official) evaluation",
        f"{'class':<16}  {'IoU':>6}" + ("  iIoU" if has_inst else ""),
    ]
    for name, v in result["class_iou"].items():
        inst = (
            f"  {pct(result['class_iiou'][name])}"
            if has_inst and name in result.get("class_iiou", {})
            else ""
        )
        lines.append(f"{name:<16}  {pct(v)}{inst}")
    for name, v in result["category_iou"].items():
        inst = f"  {pct(result['category_iiou_scores'][name])}" if has_inst else ""
        lines.append(f"[{name}]".ljust(16) + f"  {pct(v)}{inst}")
    summary = (
        f"class mIoU {pct(result['miou']).strip()}  category mIoU {pct(result['category_miou']).strip()}"
    )
    if has_inst:
        summary += f"  class iIoU {pct(result['iiou']).strip()}"
        summary += f"  category iIoU {pct(result['category_iiou']).strip()}"
    lines.append(summary)
    return "\n".join(lines)
