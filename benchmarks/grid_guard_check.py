"""What the grid modes' validation guard refused on the MNIST UNet, and what each refusal cost or saved.

In the side-by-side (``grid_side_by_side --mnist-fd2000``) the guard refused the learned grid in some MNIST cells: it
did not beat the untuned sampler on the default grid by more than 2 paired standard errors of the mean endpoint
distance to the teacher on 32 validation x_T. This script runs the same grid search (same calibration x_T, sizes,
criterion and seed) with the guard off, samples the grid it proposed from the side-by-side's 2000 evaluation x_T, and
reports FD-MNIST beside the untuned sampler, what the guard shipped (the untuned sampler, or the tau-only fallback
table) and the best hand grid / peer. A proposed grid with a better FD is a gain the guard gave up; a worse one is a
loss it prevented. calibrate's own held-out verdict on 64 fresh x_T (mean endpoint
distance to the teacher, tuned vs untuned) is reported beside it.

Cells: by default every MNIST cell of the side-by-side cache whose grid-only result samples the default grid.
Results are cached per cell in the side-by-side cache (method ``grid_unguarded``).

    OMP_NUM_THREADS=1 python -m benchmarks.grid_guard_check --medium --device cpu --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional

from . import grid_side_by_side as sbs
from .cli_args import add_common_args, log, setup
from .testbeds import load_testbed
from .writer import Run, figure, markdown_table

NAME = "grid_guard_check"
METHOD = "grid_unguarded"
PEERS = ("hand_grid", "gits", "ld3", "dmn")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--cells", nargs="+", default=None, metavar="SAMPLER@NFE",
                        help="MNIST cells to check (default: those where the guard refused the learned grid)")
    parser.add_argument("--cache-dir", default=None, help="the side-by-side's per-cell cache (default <out-dir>/"
                                                          "grid_side_by_side_cache)")
    return parser.parse_args(argv)


def side_by_side_args(args):
    """The side-by-side's settings for its --mnist-fd2000 MNIST cells (the sizes, seed and cache this check shares)."""
    if args.size != "medium":
        raise ValueError(f"{NAME} checks the side-by-side's --medium --mnist-fd2000 MNIST cells; got --{args.size}. "
                         "Pass --medium.")
    a = sbs.parse_args(["--medium", "--mnist-fd2000", "--testbeds", "mnist", "--seed", str(args.seed),
                        "--out-dir", args.out_dir] + (["--cache-dir", args.cache_dir] if args.cache_dir else []))
    a.sizes = dict(sbs.SIZES["medium"], mnist=sbs.MNIST_FD2000)
    a.cache_dir_resolved = str(Path(a.cache_dir) if a.cache_dir else Path(a.out_dir) / f"{sbs.NAME}_cache")
    return a


def cached(sargs, family: str, nfe: int, method: str) -> Optional[Dict]:
    e = sbs.cached_entry(Path(sargs.cache_dir_resolved), sargs, ("mnist", family, nfe), method)
    return e if e is not None and "metrics" in e else None


def refused_cells(sargs) -> List[str]:
    """Cells whose grid-only result samples the untuned sampler's grid (the guard refused the learned grid and shipped
    the tau-only fallback table or tau = t)."""
    out = []
    for family in sargs.sizes["mnist"]["families"]:
        for nfe in sargs.sizes["mnist"]["nfes"]:
            g, u = cached(sargs, family, nfe, "grid"), cached(sargs, family, nfe, "untuned")
            if g and u and g["grid_used"] == u["grid_used"]:
                out.append(f"{family}@{nfe}")
    return out


def parse_cells(sargs, cells: List[str]) -> List[tuple]:
    """(cell, sampler, NFE, untuned result, grid-only result) for each "SAMPLER@NFE" the side-by-side measured."""
    out = []
    for cell in cells:
        family, _, nfe = cell.partition("@")
        if family not in sargs.sizes["mnist"]["families"] or not nfe.isdigit():
            raise ValueError(f"{NAME}: cell {cell!r} is not SAMPLER@NFE with SAMPLER one of "
                             f"{', '.join(sargs.sizes['mnist']['families'])} (e.g. dpmpp@5).")
        u, g = cached(sargs, family, int(nfe), "untuned"), cached(sargs, family, int(nfe), "grid")
        if not (u and g):
            raise ValueError(f"{NAME}: no side-by-side untuned / grid-only result for mnist {cell} in "
                             f"{sargs.cache_dir_resolved}; run `python -m benchmarks.grid_side_by_side --medium "
                             f"--mnist-fd2000 --cells mnist:{cell}` first.")
        out.append((cell, family, int(nfe), u, g))
    return out


def main(argv=None):
    args = parse_args(argv)
    device = setup(args)
    sargs = side_by_side_args(args)
    run = Run(NAME, args, device)
    cells = parse_cells(sargs, args.cells if args.cells is not None else refused_cells(sargs))  # before any work
    bench = None
    rows, results = [], {}
    for cell, family, nfe, u, g in cells:
        e = cached(sargs, family, nfe, METHOD)
        if e is None:
            if run.out_of_time(f"mnist {cell}"):
                results[cell] = {"not_measured": "time budget spent"}
                continue
            if bench is None:
                bench = sbs.Bench(load_testbed("mnist", device), sargs.sizes["mnist"], sargs, device,
                                  sargs.sizes["batch"])
            log(f"{NAME}: mnist {cell}: grid search with the guard off")
            e = sbs.measure_and_cache(bench, Path(sargs.cache_dir_resolved), ("mnist", family, nfe), METHOD, {})
        floor = u["floor"]["metrics"]["fd"]
        peers = {m: cached(sargs, family, nfe, m) for m in PEERS}
        peers = {m: p["metrics"]["fd"] for m, p in peers.items() if p}
        best_peer = min(peers, key=peers.get) if peers else None
        res = {"untuned_fd": u["metrics"]["fd"], "shipped_fd": g["metrics"]["fd"],
               "floor_fd": floor, "best_peer": best_peer, "best_peer_fd": peers.get(best_peer)}
        if "metrics" in e:
            fd = e["metrics"]["fd"]
            res.update(proposed_grid=e["grid"], proposed_fd=fd,
                       proposed_gap_closed=sbs.gap_share(fd, u["metrics"]["fd"], floor),
                       verdict="gain given up" if fd < u["metrics"]["fd"] else "loss prevented",
                       heldout=e.get("heldout"), cost=e.get("cost"))
            h = e.get("heldout") or {}
            z = (h["tuned"] - h["untuned"]) / h["change_se"] if h.get("change_se") else None
            rows.append([f"mnist {cell}", f"{u['metrics']['fd']:.4g}", f"{g['metrics']['fd']:.4g}", str(e["grid"]),
                         f"{fd:.4g} ({sbs._fmt(res['proposed_gap_closed'], True)})", res["verdict"],
                         f"{100 * h['relative_change']:+.1f}% ({z:+.1f} SE)" if z is not None else "-",
                         f"{peers[best_peer]:.4g} ({sbs.LABELS[best_peer]})" if best_peer else "-"])
        else:
            res["error"] = e.get("error")
            rows.append([f"mnist {cell}", f"{u['metrics']['fd']:.4g}", "-", "-", e.get("error", "-"), "-", "-", "-"])
        results[cell] = res
    floor_fd = next((f"{r['floor_fd']:.1f}" for r in results.values() if "floor_fd" in r), "-")
    lines = ["# What the grid guard's refusals cost (MNIST UNet, FD-MNIST on 2000 samples)\n",
             "The cells where the side-by-side's guard refused the learned grid and shipped the untuned sampler or its "
             "tau-only fallback table on the default grid ('shipped': the grid-only column). "
             "'proposed': the grid the same search found, sampled without the guard; 'gap closed': the share of the "
             f"untuned -> floor gap (the floor's FD is {floor_fd}; below it, FD's sampling noise). Held-out: calibrate's verdict on "
             "its 64 fresh x_T, mean squared endpoint distance to the 40-step teacher, proposed grid vs untuned "
             "(the guard needs better than -2 SE, on 32 validation x_T).\n",
             markdown_table(["cell", "untuned FD", "shipped FD", "proposed grid", "proposed FD (gap closed)", "refusal",
                             "held-out endpoint change", "best hand grid / peer FD"], rows)]
    run.write({"cells": results, "side_by_side_cache": sargs.cache_dir_resolved}, "\n".join(lines) + "\n",
              make_figure(results))


def make_figure(results):
    """FD-MNIST per refused cell: untuned, what shipped, the proposed (refused) grid, the best hand grid / peer."""
    cells = [c for c, r in results.items() if "proposed_fd" in r]
    if not cells:
        return None
    bars = (("untuned_fd", "untuned"), ("shipped_fd", "shipped (guard)"), ("proposed_fd", "proposed grid (refused)"),
            ("best_peer_fd", "best hand grid / peer"))
    fig, axes = figure(size=(1.3 * len(cells) + 2.0, 3.6))
    ax = axes[0][0]
    width = 0.8 / len(bars)
    for k, (key, label) in enumerate(bars):
        ax.bar([i + (k - 1.5) * width for i in range(len(cells))], [results[c][key] or 0.0 for c in cells], width,
               label=label, color=f"C{k}")
    ax.axhline(results[cells[0]]["floor_fd"], color="k", ls=":", label="floor")
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels(cells, rotation=30)
    ax.set_ylabel("FD-MNIST (2000 samples)")
    ax.set_title("MNIST cells where the guard refused the learned grid")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
