"""Helpers of ``benchmarks/gpu_check.sh``: the machine description, two of its checks, and its JSON report.

    python benchmarks/gpu_check.py env            # markdown lines: date, commit, GPU, driver, torch, CUDA, cuDNN, CPU
    python benchmarks/gpu_check.py collected LOG  # how many tests a `pytest --collect-only -q` log lists (0: error)
    python benchmarks/gpu_check.py parity [--device cuda] [--out JSON] [--tiny] [--check-args]
        # FastDeconv forward and backward on DEVICE against the CPU, float32, TF32 off, the same inputs and weights:
        # relative L2 errors of the output, the input/weight/bias gradients and the running statistics
        # (isqrt_method iterate on both; auto, the default, reported too); fails above 1e-3
    python benchmarks/gpu_check.py train [--device cuda] [--iterations 160] --out-dir DIR [--tiny] [--check-args]
        # a synthetic Cityscapes (tools/make_synthetic_cityscapes.py), tools/train.py on it (configs/demo.yaml,
        # bf16 autocast), then tools/eval.py on its last.pth: fails on a non-finite loss, a loss that does not
        # fall, or an eval mIoU that differs from the run's own validation of the same checkpoint
        # (--tiny: 64x128 images, 2 iterations on the CPU, for the dry run)
    python benchmarks/gpu_check.py report-json STEPS_TSV REPORT_JSON [--result NAME=JSON ...] [--env-file F]
        # the check's JSON report: machine, steps (id, title, command, budget, seconds, result) and step results
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from machine_info import cpu_model  # benchmarks/machine_info.py (this script's folder is first on sys.path); no torch

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> str | None:
    """A command's first output line, or None when it is missing or fails."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def commit() -> str:
    head = _run(["git", "rev-parse", "--short", "HEAD"])
    if head is None:
        return "unknown (not a git checkout)"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return head + (" with uncommitted changes" if dirty else "")


def gpu_lines() -> list[str]:
    import torch

    lines = [f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
             f"Python {platform.python_version()}"]
    if not torch.cuda.is_available():
        return lines + ["- GPU: none (torch.cuda.is_available() is False)"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"- GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability "
                     f"{p.major}.{p.minor}, native bf16 {'yes' if p.major >= 8 else 'no'}")
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    lines.append(f"- driver: {driver or 'unknown (no nvidia-smi)'}")
    return lines


def environment() -> list[str]:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return [f"- date: {now}", f"- host: {platform.node()}, commit {commit()}",
            f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)", *gpu_lines()]


def collected(log: Path) -> int:
    """Tests listed by ``pytest --collect-only -q`` (``path::name`` lines), 0 when the log reports an error."""
    text = log.read_text(errors="replace")
    if re.search(r"^(ERROR|E )|errors? during collection", text, re.MULTILINE):
        return 0
    return sum(1 for line in text.splitlines() if "::" in line and not line.startswith(" "))


# -- parity: FastDeconv on the device against the CPU ---------------------------------------------------

PARITY_TOLERANCE = 1e-3
# (name, FastDeconv keywords, input shape); "stem" is built by deconvolve (the stem's settings: 15 iterations,
# float32 convolution) and fed an image-like (smooth) input.
PARITY_LAYERS = [
    ("stem 7x7/2 3->64", {"in_channels": 3, "out_channels": 64, "kernel_size": 7, "stride": 2, "padding": 3},
     (4, 3, 128, 256)),
    ("3x3 64->64 block 64", {"in_channels": 64, "out_channels": 64, "kernel_size": 3, "padding": 1, "block": 64},
     (4, 64, 64, 128)),
    ("3x3 dil 2 128->128", {"in_channels": 128, "out_channels": 128, "kernel_size": 3, "padding": 2, "dilation": 2,
                            "block": 64}, (4, 128, 32, 64)),
    ("1x1/2 256->128", {"in_channels": 256, "out_channels": 128, "kernel_size": 1, "stride": 2, "block": 64},
     (4, 256, 32, 64)),
]


def _rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _parity_layer(spec: dict, method: str):
    from torch import nn

    from seg.nn import FastDeconv, deconvolve

    layer = deconvolve(nn.Conv2d(**spec, bias=False)) if spec["in_channels"] == 3 else FastDeconv(**spec)
    layer.isqrt_method = method
    return layer


def _parity_input(shape: tuple[int, ...], gen):
    import torch
    import torch.nn.functional as F

    n, c, h, w = shape
    if c == 3:  # smooth, correlated channels: an image's ill-conditioned patch covariance
        base = F.interpolate(torch.randn(n, 1, h // 8, w // 8, generator=gen), size=(h, w), mode="bilinear")
        colour = F.interpolate(torch.randn(n, c, h // 4, w // 4, generator=gen), size=(h, w), mode="bilinear")
        return base + 0.3 * colour + 0.02 * torch.randn(n, c, h, w, generator=gen)
    return torch.relu(torch.randn(shape, generator=gen)) + 0.1


def parity(device_name: str, tiny: bool = False) -> dict:
    """Relative errors of FastDeconv on ``device_name`` against the CPU, per layer and method (``tiny``: one
    image at a quarter of the size, for the dry run)."""
    import copy

    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    device = torch.device(device_name)
    rows = []
    for method in ("iterate", "auto"):
        for name, spec, shape in PARITY_LAYERS:
            gen = torch.Generator().manual_seed(0)
            torch.manual_seed(0)
            layer = _parity_layer(spec, method)
            x = _parity_input((1, shape[1], shape[2] // 4, shape[3] // 4) if tiny else shape, gen)
            twin = copy.deepcopy(layer).to(device)
            out = {}
            for tag, mod, inp in (("cpu", layer, x), ("dev", twin, x.to(device))):
                inp = inp.clone().requires_grad_()
                y = mod(inp)
                grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
                y.backward(grad)
                out[tag] = {"output": y, "grad_input": inp.grad, "grad_weight": mod.weight.grad,
                            "grad_bias": mod.bias.grad, "running_mean": mod.running_mean,
                            "running_deconv": mod.running_deconv}
                mod.eval()
                with torch.no_grad():
                    out[tag]["eval_output"] = mod(inp.detach())
            errors = {k: _rel(out["dev"][k], out["cpu"][k]) for k in out["cpu"]}
            rows.append({"layer": name, "method": method, "input": "x".join(map(str, x.shape)), "errors": errors,
                         "max": max(errors.values())})
    gated = [r for r in rows if r["method"] == "iterate"]
    return {"device": str(device), "tolerance": PARITY_TOLERANCE, "tf32": False,
            "max_error": max(r["max"] for r in gated), "ok": all(r["max"] <= PARITY_TOLERANCE for r in gated),
            "rows": rows}


def parity_markdown(result: dict) -> str:
    keys = list(result["rows"][0]["errors"])
    lines = [f"FastDeconv on {result['device']} against the CPU, float32, TF32 off: relative L2 errors "
             f"(gate: isqrt_method iterate on both, <= {result['tolerance']:g}; auto: the default, reported)", "",
             "| layer | isqrt | input | " + " | ".join(keys) + " | max |", "|---" * (len(keys) + 4) + "|"]
    for r in result["rows"]:
        cells = " | ".join(f"{r['errors'][k]:.1e}" for k in keys)
        lines.append(f"| {r['layer']} | {r['method']} | {r['input']} | {cells} | {r['max']:.1e} |")
    lines += ["", f"largest gated error {result['max_error']:.2e}: {'ok' if result['ok'] else 'ABOVE the gate'}"]
    return "\n".join(lines)


# -- train: tools/train.py then tools/eval.py on the synthetic set ----------------------------------------

MIOU_AGREEMENT = 0.001  # validation during training and tools/eval.py, both float32, on the same checkpoint


def _run_tool(cmd: list[str], log: Path) -> None:
    """Run a tool (stdout and stderr to ``log`` and to this output); raises with the log's end on failure."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True)
    text = log.read_text(errors="replace")
    print("\n".join(text.splitlines()[-25:]), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1]} exited with {proc.returncode} (log: {log})")


def train_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    out, py = args.out_dir, sys.executable
    root, run = out / "synthetic_cityscapes", out / "run"
    size = ["--height", "64", "--width", "128"] if args.tiny else ["--height", "256", "--width", "512"]
    counts = ["--train", "4", "--val", "2"] if args.tiny else ["--train", "16", "--val", "4"]
    # Plain cross-entropy, not the demo's OHEM: OHEM's loss is the mean over the pixels still hard, which need not
    # fall as training goes on, and "the loss falls" is this check's health criterion.
    opts = [f"data.root={root}", f"train.iterations={args.iterations}", "train.amp=bf16", "train.log_interval=10",
            f"train.val_interval={args.iterations}", f"train.checkpoint_interval={args.iterations}", "train.loss=ce"]
    if args.tiny:
        opts += ["data.crop_size=[32,64]", "data.num_workers=0", "train.batch_size=2", "train.warmup_iters=1",
                 "model.deconv.block=8", "train.log_interval=1"]
    return {
        "data": [py, "tools/make_synthetic_cityscapes.py", "--root", str(root), *counts, "--test", "1", *size,
                 "--video-frames", "0"],
        "train": [py, "tools/train.py", "configs/demo.yaml", "--work-dir", str(run), "--device", args.device,
                  "--no-progress", "--opts", *opts],
        "eval": [py, "tools/eval.py", "configs/demo.yaml", str(run / "last.pth"), "--device", args.device,
                 "--out", str(out / "eval"), "--opts", f"data.root={root}", "data.num_workers=0"],
    }


def train_check(args: argparse.Namespace) -> dict:
    import json
    import math

    args.out_dir.mkdir(parents=True, exist_ok=True)
    cmds = train_commands(args)
    _run_tool(cmds["data"], args.out_dir / "data.log")
    _run_tool(cmds["train"], args.out_dir / "train.log")
    rows = [json.loads(line) for line in (args.out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["iteration"], r["loss"]) for r in rows if r["event"] == "train"]
    val = [r for r in rows if r["event"] == "val"][-1]
    _run_tool(cmds["eval"], args.out_dir / "eval.log")
    evaluated = json.loads((args.out_dir / "eval" / "metrics.json").read_text())["metrics"]
    values = [v for _, v in losses]
    k = max(1, len(values) // 5)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    result = {
        "device": args.device, "iterations": args.iterations, "amp": "bf16", "losses": losses,
        "finite": all(math.isfinite(v) for v in values), "loss_first": first, "loss_last": last,
        "falling": last < first, "val_miou": val["miou"], "eval_miou": evaluated["miou"],
        "miou_difference": abs(val["miou"] - evaluated["miou"]), "peak_mem_gb": max(r.get("peak_mem_gb", 0)
                                                                                    for r in rows if "loss" in r),
        "commands": {k: " ".join(v) for k, v in cmds.items()},
    }
    result["agree"] = result["miou_difference"] <= MIOU_AGREEMENT
    # Two tiny iterations need not lower the loss: the dry run checks the path, not the learning.
    result["ok"] = result["finite"] and result["agree"] and (result["falling"] or args.tiny)
    return result


def train_markdown(r: dict) -> str:
    return "\n".join([
        f"tools/train.py, {r['iterations']} iterations on the synthetic set, {r['amp']} autocast, {r['device']}: loss "
        f"{r['loss_first']:.3f} (mean of the first fifth of the logged values) -> {r['loss_last']:.3f} (last fifth): "
        f"{'falling' if r['falling'] else 'NOT falling'}, {'all finite' if r['finite'] else 'NOT FINITE'}; "
        f"peak memory {r['peak_mem_gb']:.2f} GB",
        f"mIoU of last.pth: validation during training {100 * r['val_miou']:.2f}, tools/eval.py "
        f"{100 * r['eval_miou']:.2f} (both float32): {'agree' if r['agree'] else 'DIFFER'}",
        f"result: {'ok' if r['ok'] else 'FAILED'}",
    ])


# -- the JSON report ---------------------------------------------------------------------------------------


def report_json(steps_tsv: Path, out: Path, results: list[str], env_file: Path | None) -> None:
    import json

    steps = []
    for line in steps_tsv.read_text().splitlines():
        sid, title, command, budget, seconds, result, log = line.split("\t")
        steps.append({"id": sid, "title": title, "command": command, "budget_s": int(budget),
                      "seconds": int(seconds) if seconds else None, "result": result, "ok": result == "ok",
                      "log": log})
    lines = env_file.read_text().splitlines() if env_file else environment()
    report: dict = {"machine": [line.removeprefix("- ") for line in lines if line.strip()], "steps": steps,
                    "results": {}}
    for item in results:
        name, _, path = item.partition("=")
        try:
            report["results"][name] = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            report["results"][name] = {"missing": f"{path}: {e}"}
    out.write_text(json.dumps(report, indent=2, allow_nan=True))


def main() -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="markdown lines describing this machine and checkout")
    count = sub.add_parser("collected", help="number of tests in a pytest --collect-only -q log")
    count.add_argument("log", type=Path)
    par = sub.add_parser("parity", help="FastDeconv on a device against the CPU, float32")
    par.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    par.add_argument("--out", type=Path, help="JSON file of the errors")
    par.add_argument("--tiny", action="store_true", help="one small image per layer (the dry run)")
    par.add_argument("--check-args", action="store_true", help="check the arguments and exit")
    tr = sub.add_parser("train", help="tools/train.py then tools/eval.py on a synthetic set")
    tr.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    tr.add_argument("--iterations", type=int, default=160)
    tr.add_argument("--out-dir", type=Path, required=True)
    tr.add_argument("--tiny", action="store_true", help="64x128 images, CPU-sized (the dry run)")
    tr.add_argument("--check-args", action="store_true", help="print the commands and exit")
    rj = sub.add_parser("report-json", help="the check's JSON report")
    rj.add_argument("steps", type=Path)
    rj.add_argument("out", type=Path)
    rj.add_argument("--result", nargs="*", default=[], metavar="NAME=JSON")
    rj.add_argument("--env-file", type=Path, help="the machine description lines (default: read them now)")
    args = parser.parse_args()
    if args.command == "env":
        print("\n".join(environment()))
    elif args.command == "collected":
        n = collected(args.log)
        print(n)
        sys.exit(0 if n > 0 else 1)
    elif args.command == "parity":
        if args.check_args:
            print(json.dumps({"device": args.device, "layers": [n for n, _, _ in PARITY_LAYERS]}))
            return
        result = parity(args.device, args.tiny)
        print(parity_markdown(result))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
        sys.exit(0 if result["ok"] else 1)
    elif args.command == "train":
        if args.check_args:
            print(json.dumps(train_commands(args)))
            return
        result = train_check(args)
        print(train_markdown(result))
        (args.out_dir / "train.json").write_text(json.dumps(result, indent=2))
        sys.exit(0 if result["ok"] else 1)
    else:
        report_json(args.steps, args.out, args.result, args.env_file)


if __name__ == "__main__":
    main()
