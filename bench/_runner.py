"""What every bench script shares: the common CLI options and the run → report → JSON → exit code flow."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("bench")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every bench takes: ``--json``, ``--threads``, ``--strict``."""
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")


def run_bench(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
    quiet_loggers: tuple[str, ...] = (),
) -> int:
    """Run, print the report and runtime, write ``--json``; non-zero with ``--strict`` on a miss."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = run(args)
    results["runtime_s"] = time.perf_counter() - t0
    print(report(results))
    print(f"\ntotal runtime {results['runtime_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        logger.info("wrote %s", args.json)
    return 1 if args.strict and not all(results["pass"].values()) else 0
