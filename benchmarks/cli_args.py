"""The command line every benchmark script shares (``--quick`` / ``--medium`` / ``--full``, ``--device``, output
folders, budget), the device it selects, and the timestamped log."""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SIZE_NAMES = ("quick", "medium", "full")
_T0 = time.time()


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick", help="tiny sizes (CI smoke run)")
    size.add_argument("--medium", dest="size", action="store_const", const="medium", help="CPU-feasible sizes")
    size.add_argument("--full", dest="size", action="store_const", const="full", help="the published sizes (GPU)")
    parser.set_defaults(size="quick")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="where <name>.json/.md/.png are written")
    parser.add_argument("--tables-dir", default=None, help="calibration-table cache (default <out-dir>/tables)")
    parser.add_argument("--no-cache", action="store_true", help="recompute calibration tables even if cached")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of this script (run_all splits its own); work left when it runs out "
                             "is skipped and listed as such in the JSON (default: no limit)")
    return parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False; use --device cpu.")
    return torch.device(name)


def setup(args) -> torch.device:
    """Apply --threads / --device and GPU speed settings, create --out-dir; return the device."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    return device


def log(msg: str) -> None:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp} +{time.time() - _T0:7.1f}s] {msg}", flush=True)
