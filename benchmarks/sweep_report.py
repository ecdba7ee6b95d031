"""What ``train_sweep.py`` writes: one record per (model, output stride, workload), and from them a
markdown table, a JSON file and a PNG plot of the ratio to BN against pixels per step.

A record (a plain dict, as stored in the JSON file)::

    {"arch": "deeplabv3", "encoder": "resnet50", "output_stride": 8, "batch": 8, "height": 480, "width": 480,
     "pixels": 1843200, "fit": true, "reason": null, "seconds": 81.2,
     "norms": {"bn": {"train_s": ..., "train_ratio": 1.0, "train_ratio_min": ..., "train_ratio_max": ...,
                      "train_samples": [...], "eval_s": ..., "eval_ratio": ..., "eval_ratio_min": ...,
                      "eval_ratio_max": ..., "eval_samples": [...], "peak_mib": ..., "step_mib": ...,
                      "memory_ratio": ...},
               "deconv": {...}, "deconv folded": {eval only}, ...}}

A ratio is the norm's median over BN's median; its spread is the smallest and the largest ratio of the paired
repetitions (repetition ``r`` of the norm against repetition ``r`` of BN, which ran next to each other).
A workload that did not fit has ``fit: false``, a ``reason`` and no ``norms``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
from machine_info import cpu_model  # benchmarks/machine_info.py

FOLDED = "deconv folded"  # the eval-only row of the deconvolution model after seg.nn.fold_deconv


# -- one record ------------------------------------------------------------------------------------------


def workload_label(batch: int, height: int, width: int) -> str:
    return f"{batch}×{height}×{width}"


def point_record(arch: str, encoder: str, output_stride: int, workload: tuple[int, int, int]) -> dict:
    batch, height, width = workload
    return dict(arch=arch, encoder=encoder, output_stride=output_stride, batch=batch, height=height, width=width,
                pixels=batch * height * width, fit=False, reason=None, seconds=None, norms={})


def _ratio(samples: dict[str, list[float]], key: str, base: str) -> dict[str, float]:
    """Median over median, and the spread of the paired per-repetition ratios."""
    paired = [a / b for a, b in zip(samples[key], samples[base])]
    return {"ratio": statistics.median(samples[key]) / statistics.median(samples[base]),
            "ratio_min": min(paired), "ratio_max": max(paired)}


def _timing(samples: dict[str, list[float]], kind: str, key: str, base: str) -> dict:
    r = _ratio(samples, key, base)
    return {f"{kind}_s": statistics.median(samples[key]), f"{kind}_samples": samples[key],
            **{f"{kind}_{k}": v for k, v in r.items()}}


def norm_results(result: dict, norms: list[str]) -> dict[str, dict]:
    """Per norm: training step, eval forward and memory of :func:`train_step.bench`'s result, with ratios to bn."""
    samples = result["samples"]
    out: dict[str, dict] = {}
    for n in norms:
        entry = {**_timing(samples, "train", f"train_{n}", "train_bn"),
                 **_timing(samples, "eval", f"eval_{n}", "eval_bn")}
        if f"peak_mib_{n}" in result:
            entry.update(peak_mib=result[f"peak_mib_{n}"], step_mib=result[f"step_mib_{n}"],
                         memory_ratio=result[f"peak_mib_{n}"] / result["peak_mib_bn"])
        out[n] = entry
    if "eval_folded" in samples:
        out[FOLDED] = _timing(samples, "eval", "eval_folded", "eval_bn")
    return out


# -- the machine -----------------------------------------------------------------------------------------


def machine_description(device: torch.device) -> str:
    text = f"{cpu_model()} ({os.cpu_count()} logical CPUs"
    try:
        text += f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM)"
    except (ValueError, OSError, AttributeError):
        text += ")"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text += f"; GPU {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return text


def run_meta(args, device: torch.device, threads: int) -> dict:
    cuda = f" (CUDA {torch.version.cuda})" if device.type == "cuda" else ""
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=machine_description(device), torch=torch.__version__ + cuda, python=platform.python_version(),
        device=device.type, threads=threads,
        precision="bf16 autocast" if device.type == "cuda" else "float32",
        encoder=args.encoder, archs=list(args.arch), output_strides=list(args.os), norms=list(args.norm),
        sizes=[workload_label(*w) for w in args.sizes], repeats=args.repeats, warmup=args.warmup,
        isqrt_method=args.isqrt_method, keep_bn=list(args.keep_bn), memory=memory_what(device, args.memory),
        command="python " + " ".join(sys.argv), loadavg_start=round(os.getloadavg()[0], 2),
    )


def memory_what(device: torch.device, measured: bool) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one training step (MiB)"
    if measured:
        return "peak resident set size of a fresh process running two training steps of one model (MiB)"
    return "not measured (--no-memory)"


# -- the report ------------------------------------------------------------------------------------------


class SweepReport:
    """The records of one sweep, written to ``<out_dir>/<name>.md``, ``.json`` and ``.png`` (after every point,
    so that an interrupted sweep leaves what it measured)."""

    def __init__(self, meta: dict, out_dir: Path, name: str):
        self.meta, self.points = meta, []
        out_dir.mkdir(parents=True, exist_ok=True)
        self.paths = {ext: out_dir / f"{name}.{ext}" for ext in ("md", "json", "png")}

    def add(self, point: dict) -> None:
        self.points.append(point)

    def write(self) -> None:
        self.meta["loadavg_end"] = round(os.getloadavg()[0], 2)
        self.paths["json"].write_text(json.dumps({"meta": self.meta, "points": self.points}, indent=1) + "\n")
        self.paths["md"].write_text(markdown(self.meta, self.points, self.paths["png"].name))
        plot(self.meta, self.points, self.paths["png"])


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _with_spread(entry: dict, kind: str) -> str:
    return (f"{_x(entry[f'{kind}_ratio'])} ({entry[f'{kind}_ratio_min']:.2f}–"
            f"{entry[f'{kind}_ratio_max']:.2f})")


def _pixels(pixels: int) -> str:
    """Pixels per step, short: 1.84M, 8.2k, 512."""
    if pixels >= 1e6:
        return f"{pixels / 1e6:.2f}M"
    return f"{pixels / 1e3:.1f}k" if pixels >= 1e3 else str(pixels)


def _model(p: dict) -> str:
    return f"{p['arch']} {p['encoder']}"


def detail_rows(points: list[dict]) -> list[str]:
    rows = []
    for p in points:
        head = f"| {_model(p)} | {p['output_stride']} | {workload_label(p['batch'], p['height'], p['width'])} " \
               f"| {_pixels(p['pixels'])} |"
        if not p["fit"]:
            reason = str(p["reason"]).replace("|", "/")
            rows.append(head + f" all | did not fit: {reason} | | | | | |")
            continue
        for norm, e in p["norms"].items():
            train = (f"{e['train_s']:.3f} | {_with_spread(e, 'train')}" if "train_s" in e else "- | -")
            mem = (f"{e['peak_mib']:.0f} | {_x(e['memory_ratio'])}" if "peak_mib" in e else "- | -")
            rows.append(head + f" {norm} | {train} | {e['eval_s']:.3f} | {_with_spread(e, 'eval')} | {mem} |")
    return rows


def curve_rows(points: list[dict], kind: str) -> tuple[str, list[str]]:
    """One row per (model, OS, norm other than bn), one column per workload: the ratio to BN."""
    sizes = sorted({(p["pixels"], workload_label(p["batch"], p["height"], p["width"])) for p in points})
    header = "| model | OS | norm | " + " | ".join(label for _, label in sizes) + " |\n" \
             + "|---|---|---|" + "---|" * len(sizes)
    cells: dict[tuple, dict[str, str]] = {}
    for p in points:
        label = workload_label(p["batch"], p["height"], p["width"])
        for norm in _curve_norms(points, kind):
            cell = cells.setdefault((_model(p), p["output_stride"], norm), {})
            e = p["norms"].get(norm)
            cell[label] = "did not fit" if not p["fit"] else (_x(e[f"{kind}_ratio"]) if e and f"{kind}_ratio" in e
                                                              else "-")
    rows = [f"| {m} | {o} | {n} | " + " | ".join(c.get(label, "") for _, label in sizes) + " |"
            for (m, o, n), c in cells.items()]
    return header, rows


def _curve_norms(points: list[dict], kind: str) -> list[str]:
    names: dict[str, None] = {}
    for p in points:
        for norm, e in p["norms"].items():
            if norm != "bn" and f"{kind}_ratio" in e:
                names[norm] = None
    return list(names)


def markdown(meta: dict, points: list[dict], png_name: str) -> str:
    lines = [
        "# Train-step sweep: cost against workload size",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- torch {meta['torch']}, Python {meta['python']}; device {meta['device']}, {meta['threads']} CPU threads, "
        f"{meta['precision']}; isqrt_method {meta['isqrt_method']}",
        f"- {meta['repeats']} repetitions after {meta['warmup']} warm-up, every norm of a model in the same "
        "interleaved repetitions; times are medians, a ratio is median over BN's median, and (min–max) is the "
        "spread of the per-repetition ratios",
        f"- memory: {meta['memory']}",
        f"- load average {meta['loadavg_start']} at the start, {meta.get('loadavg_end', '?')} at the last write",
        f"- command: `{meta['command']}`",
        "",
        f"![ratio to BN against pixels per step]({png_name})",
        "",
    ]
    for kind, what in (("train", "Training step"), ("eval", "Eval forward")):
        header, rows = curve_rows(points, kind)
        lines += [f"## {what}: ratio to BN by workload (batch×H×W)", "", header, *rows, ""]
    lines += [
        "## Every measurement",
        "",
        "| model | OS | batch×H×W | pixels/step | norm | train (s) | train ratio to BN (min–max) | eval (s) "
        "| eval ratio to BN (min–max) | peak memory (MiB) | memory ratio to BN |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *detail_rows(points),
        "",
    ]
    return "\n".join(lines)


def plot(meta: dict, points: list[dict], path: Path) -> None:
    """Ratio to BN (training step; eval forward) against pixels per step, one line per model, OS and norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    fit = [p for p in points if p["fit"]]
    for ax, kind, title in ((axes[0], "train", "training step"), (axes[1], "eval", "eval forward")):
        _plot_panel(ax, fit, kind)
        ax.set_title(f"{title}: ratio to BN")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("pixels per step (batch×H×W)")
        ax.grid(True, which="both", alpha=0.3)
    pixels = {p["pixels"] for p in fit}
    if len(pixels) == 1:  # one workload: give the log axis a width (matplotlib cannot scale a zero range)
        only = pixels.pop()
        axes[0].set_xlim(only / 2, only * 2)
    axes[0].set_ylabel("time / BN time (median; bars: min–max of paired repetitions)")
    _size_ticks(axes, points)
    if not fit:
        axes[0].text(0.5, 0.5, "no workload fitted", transform=axes[0].transAxes, ha="center")
    fig.suptitle(f"{meta['device']} · {meta['machine']} · torch {meta['torch']} · {meta['date'][:10]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_panel(ax, points: list[dict], kind: str) -> None:
    lines: dict[str, list[tuple[int, dict]]] = {}
    for p in points:
        for norm, e in p["norms"].items():
            if norm != "bn" and f"{kind}_ratio" in e:
                lines.setdefault(f"{_model(p)} OS{p['output_stride']} {norm}", []).append((p["pixels"], e))
    for label, pts in lines.items():
        pts.sort(key=lambda t: t[0])
        x = [px for px, _ in pts]
        y = [e[f"{kind}_ratio"] for _, e in pts]
        err = [[yi - e[f"{kind}_ratio_min"] for yi, (_, e) in zip(y, pts)],
               [e[f"{kind}_ratio_max"] - yi for yi, (_, e) in zip(y, pts)]]
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, label=label)
    if lines:
        ax.legend(fontsize=7)


def _size_ticks(axes, points: list[dict]) -> None:
    ticks = sorted({(p["pixels"], workload_label(p["batch"], p["height"], p["width"])) for p in points})
    if not ticks:
        return
    for ax in axes:
        ax.set_xticks([px for px, _ in ticks])
        ax.set_xticklabels([f"{label}\n{_pixels(px)}" for px, label in ticks], fontsize=7)
        ax.minorticks_off()
