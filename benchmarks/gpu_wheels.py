"""The wheels the borrowed GPU machine lacks (issue 21), and a simulation of that machine's image here.

    python benchmarks/gpu_wheels.py needed          # name==version of every distribution seg needs beyond the image
    python benchmarks/gpu_wheels.py check [--wheels .gpu_wheels]
                                                    # the list (benchmarks/gpu_wheels.txt) against `needed`; with a
                                                    # wheel folder, one cp312/manylinux x86_64 wheel per entry
    python benchmarks/gpu_wheels.py simulate DIR [--without NAME ...]
                                                    # write DIR/sitecustomize.py: hides this environment's packages
                                                    # that are neither on the image nor in the list
    python benchmarks/gpu_wheels.py imports         # import every module of seg and tools (fails on the first error)
    python benchmarks/gpu_wheels.py verify          # on the GPU machine, after the install: versions and every
                                                    # requirement of the listed wheels met by what Python finds

The image's packages are benchmarks/gpu_image_packages.txt. ``needed`` walks the requirements of this project
(``deconvseg``'s install_requires) with the markers evaluated for Python 3.12 on Linux x86-64, stopping at
distributions the image has (they bring their own), and takes each missing one at the version installed here.

The simulation: with DIR first on PYTHONPATH, every Python started (subprocesses too) runs DIR/sitecustomize.py,
whose import hook raises ModuleNotFoundError for the top-level modules of this environment's distributions that
are neither on the image nor in the list; it also sets DECONVSEG_GPU_IMAGE_SIM so ``imports`` can tell it is on.
The listed packages come from this environment's copies (the wheels are cp312; this venv may be another Python),
so the simulation checks the list's completeness, not the wheels' files (``check --wheels`` does that).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import pkgutil
import re
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIST = REPO / "benchmarks" / "gpu_wheels.txt"
IMAGE = REPO / "benchmarks" / "gpu_image_packages.txt"
PROJECT = "deconvseg"
# Target of the wheels: the GPU image's interpreter and platform.
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.0", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
              "os_name": "posix", "platform_machine": "x86_64", "extra": ""}
# Requirements the target's Python itself provides (PyPI backports of standard-library modules).
STDLIB_BACKPORTS = {"typing"}
# Distributions that provide the same modules: a requirement of the first is met by the second on the image.
EQUIVALENT = {"opencv-python": "opencv-python-headless"}
# The wheels' platform: what benchmarks/gpu_wheels.sh asks pip for.
WHEEL_TAGS = ("cp312", "abi3", "py3", "py2.py3", "none", "any")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: Path) -> list[str]:
    """Non-comment lines of a list file."""
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def image_packages() -> set[str]:
    return {normalise(n) for n in read_names(IMAGE)}


def listed_wheels() -> dict[str, str]:
    """name -> version of benchmarks/gpu_wheels.txt (``name==version`` lines)."""
    out = {}
    for line in read_names(LIST):
        name, sep, version = line.partition("==")
        if not sep or not version:
            raise SystemExit(f"{LIST}: {line!r} is not name==version")
        out[normalise(name)] = version.strip()
    return out


def _requirements(dist: str, env: dict[str, str] | None) -> list[str]:
    """Names of ``dist``'s unconditional requirements (markers evaluated for ``env``; None: this interpreter)."""
    from packaging.requirements import Requirement

    names = []
    for text in md.requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            names.append(normalise(req.name))
    return names


def needed() -> dict[str, str]:
    """name -> installed version of every distribution seg needs that the image lacks."""
    image, out = image_packages(), {}
    todo = list(_requirements(PROJECT, TARGET_ENV))
    while todo:
        name = todo.pop()
        if name in out or name in STDLIB_BACKPORTS or name in image or EQUIVALENT.get(name) in image:
            continue
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{name} is needed but not installed here; install the project first (make install)") \
                from None
        todo += _requirements(name, TARGET_ENV)
    return dict(sorted(out.items()))


def check_list() -> list[str]:
    """Problems of benchmarks/gpu_wheels.txt against what seg needs (none: the list is complete and exact)."""
    listed, want, image = listed_wheels(), needed(), image_packages()
    problems = [f"{n}=={v} is needed (not on the GPU image) but not listed in {LIST.name}"
                for n, v in want.items() if n not in listed]
    problems += [f"{n}: listed {listed[n]}, installed here {v} (the wheels must be the versions tested here)"
                 for n, v in want.items() if n in listed and listed[n] != v]
    for n, v in listed.items():
        if n in want:
            continue
        if n not in image:
            problems.append(f"{n}=={v} is listed but nothing needs it")
        else:
            try:
                here = md.version(n)
            except md.PackageNotFoundError:
                here = None
            if here != v:
                problems.append(f"{n}: listed {v} (ahead of the image's copy), installed here {here}")
    return problems


def check_folder(folder: Path) -> list[str]:
    """Problems of a wheel folder against the list: exactly one wheel per entry, for cp312 manylinux x86_64."""
    from packaging.utils import parse_wheel_filename

    listed, problems, seen = listed_wheels(), [], {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _build, tags = parse_wheel_filename(path.name)
        name = normalise(str(name))
        if name not in listed:
            problems.append(f"{path.name}: not in {LIST.name} (delete it: two versions stop the install)")
            continue
        if str(version) != listed[name]:
            problems.append(f"{path.name}: version {version}, the list says {listed[name]}")
        if not any(t.interpreter in WHEEL_TAGS and (t.platform == "any" or
                   (t.platform.startswith("manylinux") and t.platform.endswith("x86_64"))) for t in tags):
            problems.append(f"{path.name}: not a wheel for CPython 3.12 on manylinux x86_64")
        if name in seen:
            problems.append(f"{path.name} and {seen[name]}: two wheels of {name}")
        seen[name] = path.name
    problems += [f"{n}=={v}: no wheel in {folder} (run benchmarks/gpu_wheels.sh)" for n, v in listed.items()
                 if n not in seen]
    return problems


SITECUSTOMIZE = '''"""By benchmarks/gpu_wheels.py simulate: this environment as the GPU image with the listed wheels."""
import importlib.abc
import os
import sys

HIDDEN = {hidden!r}


class _GpuImage(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if "." not in fullname and fullname in HIDDEN:
            raise ModuleNotFoundError(
                f"No module named {{fullname!r}} (simulated GPU image: {{HIDDEN[fullname]}} is neither on the image "
                "nor in benchmarks/gpu_wheels.txt)", name=fullname)
        return None


sys.meta_path.insert(0, _GpuImage())
os.environ["DECONVSEG_GPU_IMAGE_SIM"] = str(len(HIDDEN))
'''


def with_requirements(names: set[str]) -> set[str]:
    """``names`` and, transitively, the requirements of those installed here (for this interpreter)."""
    out, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        if _installed(name):
            todo += _requirements(name, None)
    return out


def hidden_modules(without: frozenset[str] = frozenset()) -> dict[str, str]:
    """Top-level module -> distribution, for modules that only distributions off the image and the list provide.

    The image's packages are this environment's copies, so what they require here counts as on the image (as
    installing them into a fresh environment would bring it); the standard library is never hidden.
    """
    allowed = (with_requirements(image_packages()) | set(listed_wheels()) | {PROJECT}) - without
    hidden = {}
    for module, dists in md.packages_distributions().items():
        names = {normalise(d) for d in dists}
        if module.isidentifier() and module not in sys.stdlib_module_names and not names & allowed:
            hidden[module] = ", ".join(sorted(names))
    return dict(sorted(hidden.items()))


def simulate(directory: Path, without: frozenset[str] = frozenset()) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    hidden = hidden_modules(without)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=hidden))
    print(f"{directory}/sitecustomize.py hides {len(hidden)} top-level modules: {', '.join(hidden)}")


def import_all() -> int:
    """Import every module of seg and tools; prints failures with their last traceback lines."""
    sys.path.insert(0, str(REPO))
    names = []
    for package in ("seg", "tools"):
        pkg = importlib.import_module(package)
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]
    failed = 0
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 (report every failing module, whatever it raised)
            failed += 1
            print(f"FAILED import {name}:\n" + "".join(traceback.format_exc().splitlines(True)[-3:]))
    sim = os.environ.get("DECONVSEG_GPU_IMAGE_SIM")
    where = f"simulated GPU image ({sim} modules hidden)" if sim else "this environment"
    print(f"{len(names) - failed} of {len(names)} modules of seg and tools import in {where}")
    return failed


def verify() -> list[str]:
    """On the GPU machine: each listed distribution found at its version, and its requirements met."""
    from packaging.requirements import Requirement

    problems = []
    for name, version in listed_wheels().items():
        try:
            found = md.version(name)
        except md.PackageNotFoundError:
            problems.append(f"{name}: not installed")
            continue
        if found != version:
            problems.append(f"{name}: {found} found first on sys.path, {version} listed")
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = normalise(req.name)
            if dep in STDLIB_BACKPORTS:
                continue
            try:
                have = md.version(dep)
            except md.PackageNotFoundError:
                alt = EQUIVALENT.get(dep)
                have = md.version(alt) if alt and _installed(alt) else None
            if have is None:
                problems.append(f"{name} needs {req}: not installed")
            elif req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {req}: {have} installed")
    return problems


def _installed(name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def _report(problems: list[str], ok: str) -> int:
    for p in problems:
        print(f"  {p}")
    print(f"{len(problems)} problem(s)" if problems else ok)
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("needed", help="name==version of what seg needs beyond the GPU image")
    check = sub.add_parser("check", help="the list against what seg needs; with --wheels, the wheel folder too")
    check.add_argument("--wheels", type=Path, help="a folder of wheels to check against the list")
    sim = sub.add_parser("simulate", help="write DIR/sitecustomize.py hiding what the image lacks")
    sim.add_argument("directory", type=Path)
    sim.add_argument("--without", nargs="+", default=[], metavar="NAME",
                     help="also hide these listed distributions (a self-test: the hook must then bite)")
    sub.add_parser("imports", help="import every module of seg and tools")
    sub.add_parser("verify", help="the installed wheels: versions and requirements")
    args = parser.parse_args()
    if args.command == "needed":
        print("\n".join(f"{n}=={v}" for n, v in needed().items()))
        return 0
    if args.command == "check":
        problems = check_list()
        if args.wheels is not None:
            problems += check_folder(args.wheels)
        return _report(problems, f"{LIST.name} lists every distribution seg needs beyond the GPU image"
                       + (f"; {args.wheels} holds one matching wheel each" if args.wheels else ""))
    if args.command == "simulate":
        simulate(args.directory, frozenset(normalise(n) for n in args.without))
        return 0
    if args.command == "imports":
        return 1 if import_all() else 0
    return _report(verify(), "every listed wheel is installed at its version, with its requirements met")


if __name__ == "__main__":
    sys.exit(main())
