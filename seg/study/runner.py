"""Running a study's training runs: each one is ``tools/train.py`` in a child process, N at a time.

:func:`inspect_run` decides from the run folder what to do (skip a finished or diverged run, resume an
interrupted one, start a new one); :func:`run_all` runs the rest in a small pool. A first Ctrl-C (or SIGTERM)
asks every running child to stop, which makes it save ``last.pth`` and exit; a second one is passed on
too, and stops the children at once (tools/train.py's second-Ctrl-C rule).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from seg.checkpoint import LAST, load_checkpoint
from seg.config import ConfigError, from_dict, to_dict
from seg.engine.checkpointer import config_changes
from seg.study.aggregate import read_metrics
from seg.study.config import REPO_ROOT, RunSpec

TRAIN = REPO_ROOT / "tools" / "train.py"
LOG = "train.log"
TAIL_LINES = 15
# Settings that may differ between a run folder and the study without changing the results.
HARMLESS = ("data.num_workers",)


@dataclass
class Outcome:
    """What happened to a run this time: finished | diverged | failed | interrupted."""

    status: str
    message: str | None = None


def inspect_run(spec: RunSpec) -> str:
    """``done`` (finished: last.pth at the last iteration), ``diverged`` (the folder's last record says so),
    ``resume`` (a last.pth to continue from) or ``new``.

    A folder whose checkpoint was trained with other settings is an error: resuming or skipping it would mix
    two experiments under one name.
    """
    last = spec.work_dir / LAST
    ckpt = load_checkpoint(last) if last.is_file() else None
    if ckpt is not None:
        stored = to_dict(from_dict(ckpt["config"], str(last)))
        changes = [c for c in config_changes(stored, to_dict(spec.cfg)) if not c.startswith(HARMLESS)]
        if changes:
            raise ConfigError(
                f"{last} was trained with other settings than the study asks for ({'; '.join(changes[:3])}); "
                f"delete {spec.work_dir} or choose another --out"
            )
    rows = read_metrics(spec.work_dir / "metrics.jsonl")
    if rows and rows[-1].get("event") == "diverged":
        return "diverged"  # resuming would replay the same steps into the same NaN
    if ckpt is None:
        return "new"
    return "done" if int(ckpt["iteration"]) >= spec.cfg.train.iterations else "resume"


def train_command(spec: RunSpec, device: str, resume: bool) -> list[str]:
    cmd = [sys.executable, str(TRAIN), str(spec.base), "--device", device, "--no-progress",
           "--work-dir", str(spec.work_dir)]
    return [*cmd, *(["--resume"] if resume else []), "--opts", *spec.overrides]


def child_env(slot: int, jobs: int, device: str, gpus: int) -> dict[str, str]:
    """The child's environment: unbuffered output, the repository importable, and with several jobs a share
    of the CPU threads (unless OMP_NUM_THREADS is set already) and one GPU per slot, round robin."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", NO_ALBUMENTATIONS_UPDATE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(threads_per_job(jobs)))
        if device == "cuda" and gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_job(jobs: int) -> int:
    """CPU threads per child when ``jobs`` run at once: otherwise each would start one per core and they
    would fight over the cores."""
    return max(1, cpu_count() // jobs)


class _Stop:
    """Counts SIGINT/SIGTERM received by the study, so the pool loop can pass each on to the children."""

    def __init__(self) -> None:
        self.count, self.signum = 0, None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        self.signum = self.signum or signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class _Child:
    spec: RunSpec
    proc: subprocess.Popen
    log: IO[str]
    log_start: int  # where this attempt's output begins in train.log

    def tail(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            f.seek(self.log_start)
            lines = [line for line in f.read().splitlines() if line.strip()]
        return "\n".join(lines[-TAIL_LINES:])


def _start(spec: RunSpec, device: str, resume: bool, env: dict[str, str]) -> _Child:
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(spec, device, resume)
    log = open(spec.work_dir / LOG, "a")  # noqa: SIM115 - closed when the child ends
    log.write(f"\n==> {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
    log.flush()
    # A session of its own: a Ctrl-C in the terminal reaches only the study, which passes on exactly one
    # SIGINT per Ctrl-C (two at once would make train.py stop without saving).
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return _Child(spec, proc, log, log.tell())


def _outcome(child: _Child, code: int, stopping: bool) -> Outcome:
    """Exit code -> outcome: 0 finished; 1 with a last 'diverged' record diverged; 128+n after our stop
    request interrupted; anything else failed, with the end of the log."""
    rows = read_metrics(child.spec.work_dir / "metrics.jsonl")
    if code == 0:
        return Outcome("finished")
    if code == 1 and rows and rows[-1].get("event") == "diverged":
        return Outcome("diverged", rows[-1].get("message"))
    if stopping and code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        return Outcome("interrupted", f"stopped; continue by running the study again ({LAST} was saved)")
    tail = child.tail()
    last = tail.splitlines()[-1] if tail else "no output"
    return Outcome("failed", f"exit code {code}: {last}\nend of {child.spec.work_dir / LOG}:\n{tail}")


def run_all(
    todo: list[tuple[RunSpec, bool]],
    device: str,
    jobs: int = 1,
    gpus: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[dict[tuple[str, int], Outcome], int | None]:
    """Run ``(spec, resume)`` pairs, ``jobs`` at a time; returns each run's outcome and the signal that stopped
    the study (None when every run ended by itself)."""
    pending, running = deque(todo), {}  # slot -> _Child
    outcomes: dict[tuple[str, int], Outcome] = {}
    passed_on = 0
    with _Stop() as stop:
        try:
            while running or (pending and not stop.count):  # after a stop, the pending runs never start
                if stop.count > passed_on:  # pass each stop request on to every running child, once
                    for child in running.values():
                        child.proc.send_signal(signal.SIGINT)
                    passed_on = stop.count
                while pending and not stop.count and len(running) < jobs:
                    spec, resume = pending.popleft()
                    slot = min(set(range(jobs)) - set(running))
                    running[slot] = _start(spec, device, resume, child_env(slot, jobs, device, gpus))
                    what = "resume" if resume else "start"
                    log(f"{what} {spec.label} (log: {spec.work_dir / LOG})")
                for slot, child in list(running.items()):
                    code = child.proc.poll()
                    if code is not None:
                        del running[slot]
                        outcomes[child.spec.key] = _finish(child, code, stop.count > 0, log)
                time.sleep(0.2)
        finally:
            _stop_children(list(running.values()))  # only after an error of the study itself
    return outcomes, stop.signum


def _finish(child: _Child, code: int, stopping: bool, log: Callable[[str], None]) -> Outcome:
    outcome = _outcome(child, code, stopping)
    child.log.close()
    first_line = outcome.message.splitlines()[0] if outcome.message else ""
    log(f"{outcome.status} {child.spec.label}" + (f": {first_line}" if first_line else ""))
    return outcome


def _stop_children(children: list[_Child]) -> None:
    """Ask the children to save and stop, and wait for them: none outlives the study."""
    for child in children:
        child.proc.send_signal(signal.SIGINT)
    for child in children:
        child.proc.wait()
        child.log.close()
