"""The wheels a lent GPU machine lacks: optuna and its dependencies, and torchao, which the GPU image does not have (it has
torch, numpy, packaging, transformers; it cannot download anything). Downloaded here for that machine's Python
(3.12, manylinux x86_64) into the ignored folder ``.whl/``, carried along, installed there without network.

Here, with network:    python benchmarks/gpu/wheels.py download     # runs the pip download command (into .whl/)
                       python benchmarks/gpu/wheels.py command      # prints it (the README quotes it)
On the GPU machine:    python benchmarks/gpu/wheels.py install .whl DEPS
                       # installs into DEPS (for PYTHONPATH) the wheels whose package is missing there, or
                       # older than another wheel asks for; never torch, never one the image already has
                       # in a fitting version (its PyYAML, tqdm, typing_extensions stay in use)

The pins are the versions the CI environment runs the test suite with.
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata
import importlib.util
import pathlib
import re
import subprocess
import sys
import zipfile

#: optuna and every dependency of it that the GPU image may lack (numpy and packaging it has); torchao for FP8
#: (the ``autoprec[fp8]`` extra: its FP8 tests run natively on an sm89+ GPU; 3.4 MB, no dependencies)
PINS = ("optuna==5.1.0", "SQLAlchemy==2.1.9", "alembic==1.20.1", "colorlog==6.12.0", "Mako==1.4.3",
        "MarkupSafe==3.0.4", "PyYAML==6.0.4", "tqdm==4.70.1", "typing_extensions==4.16.0", "torchao==0.18.0")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download_command(dest: str = ".whl") -> list[str]:
    """The ``pip download`` command that fetches :data:`PINS` for the GPU machine's Python into ``dest``.

    Example:
        >>> " ".join(download_command())[:60]
        'pip download --no-deps --only-binary=:all: --python-version '
    """
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    return ["pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation",
            "cp", *platforms, "-d", dest, *PINS]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _metadata(wheel: pathlib.Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return email.parser.Parser().parsestr(z.read(name).decode())


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def plan(wheel_dir: str | pathlib.Path) -> tuple[list[pathlib.Path], list[str]]:
    """(the wheels in ``wheel_dir`` to install here, the requirements neither this Python nor those wheels meet).

    A wheel is installed where its distribution is missing, or where a wheel being installed requires a version
    of it that the installed one is not; requirements are read from the wheels' metadata, markers evaluated
    for this Python.

    Example:
        >>> import tempfile
        >>> plan(tempfile.mkdtemp())
        ([], [])
    """
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare Python: pip's own copy
        from pip._vendor.packaging.requirements import Requirement

    wheels = {}
    for w in sorted(pathlib.Path(wheel_dir).glob("*.whl")):
        meta = _metadata(w)
        wheels[_norm(meta["Name"])] = (w, meta.get_all("Requires-Dist") or [])
    picked = [n for n in wheels if _installed(n) is None]
    unmet: list[str] = []
    todo = list(picked)
    while todo:
        for line in wheels[todo.pop()][1]:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name, have = _norm(req.name), _installed(req.name)
            if have is not None and req.specifier.contains(have, prereleases=True) or name in picked:
                continue
            if name in wheels:
                picked.append(name)
                todo.append(name)
            elif line not in unmet:
                unmet.append(line)
    return [wheels[n][0] for n in picked], unmet


def _unpack(wheel: pathlib.Path, target: pathlib.Path) -> None:
    """A wheel's importable files into ``target`` (what ``pip install --target`` does, without pip)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            m = re.match(r"[^/]+\.data/(purelib|platlib)/(.+)", name)
            if m:
                name = m.group(2)
            elif re.match(r"[^/]+\.data/", name):
                continue  # scripts, headers, data: nothing an import needs
            dest = target / name
            if info.is_dir():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(info))


def install(wheel_dir: str | pathlib.Path, target: str | pathlib.Path) -> tuple[list[pathlib.Path], list[str]]:
    """Install :func:`plan`'s wheels into ``target`` (``pip install --no-index --no-deps --target``, or unpacked
    where this Python has no pip); returns what :func:`plan` returned.

    Example:
        >>> import tempfile
        >>> install(tempfile.mkdtemp(), tempfile.mkdtemp())
        ([], [])
    """
    wheels, unmet = plan(wheel_dir)
    target = pathlib.Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if wheels and importlib.util.find_spec("pip") is not None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--target", str(target), *map(str, wheels)], check=True)
    else:
        for w in wheels:
            _unpack(w, target)
    return wheels, unmet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("command", help="print the pip download command")
    d = sub.add_parser("download", help="run it")
    d.add_argument("--dest", default=".whl")
    i = sub.add_parser("install", help="install the wheels this Python lacks into a folder")
    i.add_argument("wheel_dir")
    i.add_argument("target")
    args = p.parse_args(argv)
    if args.what == "command":
        print(" ".join(download_command()))
        return 0
    if args.what == "download":
        rc = subprocess.run([sys.executable, "-m", *download_command(args.dest)], check=False).returncode
        got = [p for p in pathlib.Path(args.dest).glob("*.whl") if any(p.name.lower().startswith(
            _norm(pin.split("==")[0]).replace("-", "_").lower() + "-") for pin in PINS)]
        print(f"{len(got)} wheels, {sum(p.stat().st_size for p in got) / 2**20:.1f} MiB in {args.dest}")
        return rc
    if not pathlib.Path(args.wheel_dir).is_dir():
        print(f"no folder {args.wheel_dir}: download the wheels first ({' '.join(download_command())})",
              file=sys.stderr)
        return 2
    try:
        wheels, unmet = install(args.wheel_dir, args.target)
    except subprocess.CalledProcessError as e:
        print(f"pip install failed (exit {e.returncode})", file=sys.stderr)
        return e.returncode
    print(f"installed into {args.target}: {', '.join(w.name for w in wheels) or 'nothing (all present)'}")
    if unmet:
        print(f"requirements met neither here nor by the wheels: {', '.join(unmet)}", file=sys.stderr)
    return 1 if unmet else 0


if __name__ == "__main__":
    sys.exit(main())
