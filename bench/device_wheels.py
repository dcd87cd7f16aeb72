"""Wheels that let the benchmarks run on a lent GPU machine (the workplace's ``device`` tool, an H200).

That machine reaches no package index and its image already holds torch (CUDA), numpy, httpx,
prometheus-client and many more, but not the service's web, database and queue packages. This
script finds what the service and the benchmarks import, beyond that image's packages, by walking
the requirements of the packages installed *here* (so the versions are the ones the tests pass
with), and downloads those wheels for the machine's Python into ``.whl/`` (kept out of git through
``.git/info/exclude``). ``transformers``, ``peft`` and what they need are always taken (the image has
other versions; the benchmark compares against ``peft`` 0.21.2).

    python bench/device_wheels.py [--python-version 3.12] [--dest .whl]

Then, in one device ``run`` with ``carry: [".whl"]`` (see bench/README.md for the whole command)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

logger = logging.getLogger("device_wheels")

ROOT = Path(__file__).resolve().parents[1]

# what the service and the benchmarks import (pyproject's runtime dependencies the server needs, and
# the oracle the serving benchmark compares with)
WANTED = ("fastapi", "uvicorn", "celery", "redis", "sqlalchemy", "alembic", "pydantic", "pydantic-settings",
          "python-multipart", "transformers", "peft")
# always carried with their requirements, even where the image has a version of its own
PINNED = ("transformers", "peft", "huggingface-hub", "tokenizers", "regex")
# the image's packages (the device tool's KINDS.md, read 2026-11-17), taken as they are there
_IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle colorama einops filelock frozenlist fsspec h11 hf-xet httpcore
httpx idna jinja2 markdown-it-py markupsafe mdurl ml-dtypes mpmath msgpack multidict networkx numpy
packaging pillow pip prometheus-client propcache psutil pygments python-dateutil pyyaml regex
requests rich safetensors setuptools shellingham six sympy tqdm triton typer typing-extensions
urllib3 uvloop wheel xxhash yarl zipp torch
"""
ON_THE_IMAGE = frozenset(_IMAGE_PACKAGES.split())
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(python_version: str) -> dict[str, str]:
    """``{name: version}`` of every installed package the wanted ones need, minus the image's own."""
    env = default_environment()
    # a late patch release (the H200 image's Python is 3.12.3): backports for early patches stay out
    env.update({"python_version": python_version, "python_full_version": f"{python_version}.99",
                "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                "implementation_name": "cpython", "platform_python_implementation": "CPython"})
    found: dict[str, str] = {}
    todo = [_norm(n) for n in WANTED]
    while todo:
        name = todo.pop()
        if name in found or (name in ON_THE_IMAGE and name not in PINNED):
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError as exc:
            raise SystemExit(f"{name} is not installed here: pip install -e '.[dev]' first") from exc
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                todo.append(_norm(req.name))
    return dict(sorted(found.items()))


def download(packages: dict[str, str], python_version: str, dest: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(dest),
               *(f"{name}=={version}" for name, version in packages.items())]
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl", help="where the wheels go (default .whl/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    packages = closure(args.python_version)
    logger.info("%d packages: %s", len(packages), " ".join(f"{n}=={v}" for n, v in packages.items()))
    args.dest.mkdir(parents=True, exist_ok=True)
    exclude = ROOT / ".git" / "info" / "exclude"
    dest = args.dest.resolve()
    if dest.is_relative_to(ROOT) and exclude.parent.is_dir():  # keep the wheels out of git
        pattern = f"/{dest.relative_to(ROOT).as_posix()}/"
        if pattern not in (exclude.read_text().splitlines() if exclude.exists() else []):
            with exclude.open("a") as f:
                f.write(pattern + "\n")
    stale = list(args.dest.glob("*.whl"))
    for wheel in stale:  # one version of each: two would stop the install there
        wheel.unlink()
    download(packages, args.python_version, args.dest)
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    logger.info("%d wheels, %.1f MiB in %s (the device tool carries at most 64 MiB in all)", len(wheels), size,
                args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
