"""Run every benchmark, then write benchmarks/results/SUMMARY.md (+ summary.json) from their JSON.

The headline table and the verdict on each target are computed from the scripts' JSON files, never typed.

Usage (the published run, one GPU, a few minutes):
    python -m benchmarks.run_all --full --device cuda
CPU-feasible run: --medium --device cpu --threads 2; CI smoke run: --quick (seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import cli_args, families, writer
from . import calibration_cost, inference_overhead, peers, quality_vs_nfe, trajectory_error

# quality_vs_nfe first: it computes most calibration tables, which the others then read from the cache.
SHARES = {"quality_vs_nfe": 0.5, "trajectory_error": 0.15, "peers": 0.17, "calibration_cost": 0.13,
          "inference_overhead": 0.05}
SCRIPTS = {
    "quality_vs_nfe": quality_vs_nfe,
    "trajectory_error": trajectory_error,
    "peers": peers,
    "calibration_cost": calibration_cost,
    "inference_overhead": inference_overhead,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli_args.add_common_args(parser)
    parser.add_argument("--only", nargs="*", choices=list(SCRIPTS), default=None, help="run only these scripts")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild SUMMARY.md from existing JSON")
    parser.add_argument("--replot", action="store_true", help="with --summary-only: redraw every PNG from its JSON")
    parser.add_argument("--total-budget-s", type=float, default=None,
                        help="wall-clock budget of the whole run, split across the scripts by SHARES (time a script "
                             "leaves unused goes to the next ones); work left when a script's share is spent is "
                             "skipped and listed in its JSON")
    return parser.parse_args(argv)


def main(args) -> dict:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    if not args.summary_only:
        names = args.only or list(SCRIPTS)
        for k, name in enumerate(names):
            if args.total_budget_s is not None:
                left = args.total_budget_s - (time.perf_counter() - start)
                args.budget_s = max(0.0, left * SHARES[name] / sum(SHARES[n] for n in names[k:]))
            cli_args.log(f"run_all: start {name} ({args.size}"
                         + (f", budget {args.budget_s:.0f} s)" if args.budget_s is not None else ")"))
            t0 = time.perf_counter()
            SCRIPTS[name].main(args)
            timings[name] = time.perf_counter() - t0
            cli_args.log(f"run_all: done {name} in {timings[name]:.1f} s")
    if args.summary_only and args.replot:
        replot(out_dir)
    summary = summarize(out_dir)
    summary["script_wall_time_s"] = timings
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    (out_dir / "SUMMARY.md").write_text(summary_markdown(summary))
    (out_dir / "README_SECTION.md").write_text(readme_section(summary))
    cli_args.log(f"run_all: wrote {out_dir / 'SUMMARY.md'}")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# summary: headline table + targets, computed from the JSON files
# ----------------------------------------------------------------------------------------------------------------
def _load(out_dir: Path, name: str):
    path = out_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def best_tuned(entry, key="fd"):
    """(objective, value) of the best tuned table of one quality entry."""
    vals = {o: m[key] for o, m in entry["tuned"].items() if key in m}
    if not vals:
        return None, None
    o = min(vals, key=vals.get)
    return o, vals[o]


def _fmt_change(e, obj, v, ch, key="fd"):
    fails = "; ".join(f"{o}: {m[:100]}" for o, m in e.get("failed", {}).items())
    fails = f" [no table for {fails}]" if fails else ""
    if v is None:
        return f"untuned {e['untuned'][key]:.4g}; no tuned table{fails}"
    return f"{e['untuned'][key]:.4g} -> {v:.4g} ({100 * ch:+.1f}%, best objective {obj}){fails}"


def quality_cell(q, tb, g, family, nfe):
    try:
        return q["results"]["testbeds"][tb][g]["families"][family][str(nfe)]
    except (KeyError, TypeError):
        return None


def target(name, goal, met, measured, note=""):
    return {"target": name, "goal": goal, "met": met, "measured": measured, "note": note}


def headroom(q, tb, g, e):
    """How far below the untuned FD the many-step floor lies (the most a better time input could plausibly win)."""
    floor = q["results"]["testbeds"][tb][g]["floor"]
    ch = writer.rel_change(floor["fd"], e["untuned"]["fd"])
    return f"{floor['steps']}-step floor FD {floor['fd']:.4g} = {100 * ch:+.1f}% vs untuned"


def targets(q, p, o) -> list:
    out = []
    # 1. DDIM at 10 steps on the trained model.
    e = quality_cell(q, "mnist", "g1", "ddim", 10)
    if e is None:
        out.append(target("MNIST DDIM NFE=10 FD-MNIST", "<= -30% vs untuned", None, "not measured at this size"))
    else:
        obj, v = best_tuned(e)
        ch = writer.rel_change(v, e["untuned"]["fd"])
        out.append(target("MNIST DDIM NFE=10 FD-MNIST", "<= -30% vs untuned", ch is not None and ch <= -0.30,
                          _fmt_change(e, obj, v, ch), headroom(q, "mnist", "g1", e)))
    # 2. DPM-Solver at 5 steps.
    for fam in ("dpm2", "dpmpp"):
        e = quality_cell(q, "mnist", "g1", fam, 5)
        label = families.FAMILIES[fam].label
        if e is None:
            out.append(target(f"MNIST {label} NFE=5 FD-MNIST", "<= -15% vs untuned", None,
                              "not measured at this size"))
            continue
        obj, v = best_tuned(e)
        ch = writer.rel_change(v, e["untuned"]["fd"])
        out.append(target(f"MNIST {label} NFE=5 FD-MNIST", "<= -15% vs untuned", ch is not None and ch <= -0.15,
                          _fmt_change(e, obj, v, ch), headroom(q, "mnist", "g1", e)))
    # 3. No NFE worse than untuned (trained model), per objective.
    if q is not None and "mnist" in q["results"]["testbeds"]:
        worse, total = {}, {}
        for g, g_out in q["results"]["testbeds"]["mnist"].items():
            for fam, per_nfe in g_out["families"].items():
                for nfe, e in per_nfe.items():
                    for obj, m in e["tuned"].items():
                        total[obj] = total.get(obj, 0) + 1
                        if m["fd"] > e["untuned"]["fd"]:
                            worse.setdefault(obj, []).append(f"{fam}@{nfe}/{g}")
        clean = [o for o in total if not worse.get(o)]
        default = q["results"].get("package_default_objective")
        if default not in total:
            out.append(target("MNIST every sampler x NFE x guidance: tuned never worse than untuned",
                              f"0 cells worse with the package default objective ({default})", None,
                              "; ".join(f"{o}: {len(worse.get(o, []))}/{total[o]} cells worse" for o in total),
                              f"the default objective ({default}) was not run on MNIST at this size"))
            return out + _targets_rest(q, p, o)
        if not total:
            out.append(target("MNIST every sampler x NFE x guidance: tuned never worse than untuned",
                              "0 cells worse with the package default objective", None,
                              "no tuned cells at this size"))
            return out + _targets_rest(q, p, o)
        measured = "; ".join(f"{o}: {len(worse.get(o, []))}/{total[o]} cells worse"
                             + (f" ({', '.join(worse[o][:6])}{'...' if len(worse[o]) > 6 else ''})"
                                if worse.get(o) else "") for o in total)
        out.append(target("MNIST every sampler x NFE x guidance: tuned never worse than untuned",
                          f"0 cells worse with the package default objective ({default})",
                          default in total and default in clean, measured,
                          f"objectives with no worse cell: {clean or 'none'}"))
    return out + _targets_rest(q, p, o)


def _targets_rest(q, p, o) -> list:
    out = []
    # 4. Exact-score model, DDIM at 10 steps.
    e = quality_cell(q, "gmm", "g1", "ddim", 10)
    if e is None:
        out.append(target("GMM DDIM NFE=10 endpoint L2 / FD", "<= -25% / <= -40%", None,
                          "not measured at this size"))
    else:
        obj_l, v_l = best_tuned(e, "endpoint_l2")
        obj_f, v_f = best_tuned(e)
        ch_l = writer.rel_change(v_l, e["untuned"]["endpoint_l2"])
        ch_f = writer.rel_change(v_f, e["untuned"]["fd"])
        out.append(target("GMM DDIM NFE=10 endpoint L2", "<= -25% vs untuned", ch_l is not None and ch_l <= -0.25,
                          _fmt_change(e, obj_l, v_l, ch_l, "endpoint_l2")))
        out.append(target("GMM DDIM NFE=10 FD", "<= -40% vs untuned", ch_f is not None and ch_f <= -0.40,
                          _fmt_change(e, obj_f, v_f, ch_f), headroom(q, "gmm", "g1", e)))
    # 5. Default optimiser vs the reference Adam.
    if p is not None:
        rows = [(tb, k, e) for tb, r in p["results"]["testbeds"].items() for k, e in r["optimizers"].items()
                if "failed" not in e]
        failed = [f"{tb} {k}" for tb, r in p["results"]["testbeds"].items() for k, e in r["optimizers"].items()
                  if "failed" in e]
        if failed:
            out.append(target("Default optimiser vs reference Adam (calibration failed)", "-", False,
                              "; ".join(failed)))
        if rows:
            ok = all(e["max_abs_r_difference"] <= 0.01 and (e["evaluation_ratio_adam_over_default"] or 0) >= 30
                     for _, _, e in rows)
            measured = "; ".join(f"{tb} {k}: max|dr| {e['max_abs_r_difference']:.4f}, evals x"
                                 f"{(e['evaluation_ratio_adam_over_default'] or float('nan')):.1f}"
                                 for tb, k, e in rows)
            out.append(target("Default optimiser vs reference Adam", "max |r - r_adam| <= 0.01 and >= 30x fewer "
                              "model evaluations", ok, measured))
    # 6. Inference overhead.
    if o is not None:
        out.append(overhead_target(o))
    return out


def overhead_target(o) -> dict:
    """met when the bootstrap 95% CI of the median paired ratio lies at or below 1.01, missed when it lies above,
    otherwise unresolved (met None): the timing noise of the machine does not decide it. The note always gives the
    scheduler-only bound, which does not depend on the network's timing noise."""
    name, goal = "Inference overhead (tuned / untuned pipeline call)", "<= 1.01"
    r = o["results"]
    pl = r["pipeline"]
    if "paired_ratio_ci95" not in pl:  # results written before the paired statistics existed
        ratio = pl["ratio_tuned_over_untuned"]
        return target(name, goal, ratio <= 1.01, f"ratio of medians {ratio:.4f} ({o['device']})")
    lo, hi = pl["paired_ratio_ci95"]
    met = True if hi <= 1.01 else (False if lo > 1.01 else None)
    b = r["scheduler_bound"]
    measured = (f"median paired ratio {pl['median_paired_ratio']:.4f}, 95% CI [{lo:.4f}, {hi:.4f}] "
                f"({len(pl['paired_ratios'])} reps, batch {r['settings']['batch']}); ratio of medians "
                f"{pl['ratio_tuned_over_untuned']:.4f} ({o['device']})")
    note = (f"scheduler-only bound 1 + ({1e6 * b['scheduler_s_per_step']['tuned']:.1f} - "
            f"{1e6 * b['scheduler_s_per_step']['untuned']:.1f} us) / {1e3 * b['pipeline_untuned_s_per_step']:.1f} "
            f"ms per step = {b['ratio_bound']:.5f}")
    out = target(name, goal, met, measured, note)
    if met is None:
        out["verdict"] = "unresolved (CI straddles 1.01)"
    return out


def verdict_text(t: dict) -> str:
    """met / missed / n/a, or the target's own verdict (e.g. unresolved) when it has one."""
    return t.get("verdict") or {True: "met", False: "missed", None: "n/a"}[t["met"]]


def headline(q) -> list:
    rows = []
    if q is None:
        return rows
    for tb, per_g in q["results"]["testbeds"].items():
        for g, g_out in per_g.items():
            for fam, per_nfe in g_out["families"].items():
                for nfe, e in per_nfe.items():
                    obj, v = best_tuned(e)
                    rows.append({"testbed": tb, "guidance": g[1:], "sampler": families.FAMILIES[fam].label,
                                 "nfe": int(nfe), "untuned_fd": e["untuned"]["fd"], "best_tuned_fd": v,
                                 "best_objective": obj, "change": writer.rel_change(v, e["untuned"]["fd"]),
                                 "floor_fd": g_out["floor"]["fd"], "floor_steps": g_out["floor"]["steps"]})
    return rows


def scoreboard(q) -> list:
    """Per testbed and objective: cells run, better / worse than untuned, median and best FD change."""
    rows = []
    if q is None:
        return rows
    for tb, per_g in q["results"]["testbeds"].items():
        changes, failed = {}, {}
        for g_out in per_g.values():
            for per_nfe in g_out["families"].values():
                for e in per_nfe.values():
                    for obj, m in e["tuned"].items():
                        changes.setdefault(obj, []).append(writer.rel_change(m["fd"], e["untuned"]["fd"]))
                    for obj in e.get("failed", {}):
                        failed[obj] = failed.get(obj, 0) + 1
        for obj in sorted(set(changes) | set(failed)):
            ch = sorted(changes.get(obj, []))
            rows.append({"testbed": tb, "objective": obj, "cells": len(ch), "failed": failed.get(obj, 0),
                         "better": sum(c < 0 for c in ch), "worse": sum(c > 0 for c in ch),
                         "median_change": ch[len(ch) // 2] if ch else None, "best_change": ch[0] if ch else None})
    return rows


def replot(out_dir: Path) -> None:
    """Redraw each script's PNG from its JSON (plots are pure functions of the results)."""
    import matplotlib.pyplot as plt

    for name, module in SCRIPTS.items():
        d = _load(out_dir, name)
        if d is None:
            continue
        res = d["results"]
        fig = module.plot(res, res["settings"]) if name == "trajectory_error" else module.plot(res)
        fig.savefig(out_dir / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)


def summarize(out_dir: Path) -> dict:
    q, p, o = (_load(out_dir, n) for n in ("quality_vs_nfe", "peers", "inference_overhead"))
    runs = {n: {"size": d["size"], "device": d["device"], "command": d["command"], "wall_time_s": d["wall_time_s"],
                "git_commit": d["git_commit"]}
            for n in SCRIPTS if (d := _load(out_dir, n)) is not None}
    return {"runs": runs, "headline": headline(q), "targets": targets(q, p, o), "objectives": scoreboard(q),
            "package_default_objective": q["results"].get("package_default_objective") if q else None}


def summary_markdown(s: dict) -> str:
    out = ["<!-- generated by benchmarks/run_all.py from the JSON files; do not edit -->\n",
           "# Benchmark summary\n\n## Runs\n\n"]
    out.append(writer.markdown_table(["script", "size", "device", "wall s", "commit"],
                                     [[n, r["size"], r["device"], r["wall_time_s"], r["git_commit"][:12]]
                                      for n, r in s["runs"].items()]))
    sizes = {r["size"] for r in s["runs"].values()}
    if sizes - {"full"}:
        out.append(f"\n**Sizes: {', '.join(sorted(sizes))}** - not the published (`--full`) sizes: fewer samples, "
                   "NFEs and calibration samples (see each JSON's `settings`); FD values are biased upwards at "
                   "small sample counts and comparable only within one size.\n")
    out.append("\n## Headline: FD, untuned vs best tuned table, same x_T\n\n")
    wanted = [r for r in s["headline"] if r["nfe"] in (4, 5, 10, 20)] or s["headline"]
    out.append(writer.markdown_table(
        ["testbed", "guidance", "sampler", "NFE", "untuned FD", "tuned FD", "change", "objective", "floor FD"],
        [[r["testbed"], r["guidance"], r["sampler"], r["nfe"], r["untuned_fd"], r["best_tuned_fd"],
          None if r["change"] is None else f"{100 * r['change']:+.1f}%", r["best_objective"],
          f"{r['floor_fd']:.4g} ({r['floor_steps']} steps)"] for r in wanted]))
    out.append("\n## Objectives: FD change vs untuned over every cell measured (sampler x NFE x guidance)\n\n")
    out.append(writer.markdown_table(
        ["testbed", "objective", "cells", "better", "worse", "no table (failed)", "median change", "best change"],
        [[r["testbed"], r["objective"] + (" (package default)" if r["objective"] == s.get("package_default_objective")
                                          else ""), r["cells"], r["better"], r["worse"], r["failed"],
          None if r["median_change"] is None else f"{100 * r['median_change']:+.1f}%",
          None if r["best_change"] is None else f"{100 * r['best_change']:+.1f}%"] for r in s["objectives"]]))
    out.append("\n## Targets\n\n")
    out.append(writer.markdown_table(
        ["target", "goal", "met", "measured", "note"],
        [[t["target"], t["goal"], verdict_text(t) if verdict_text(t) == "n/a" else f"**{verdict_text(t)}**",
          t["measured"], t["note"]] for t in s["targets"]]))
    return "".join(out)


def recommendation(s: dict) -> list:
    """Sentences computed from the scoreboard and the optimiser comparison (for the package README)."""
    out = []
    for tb, what in (("mnist", "the trained MNIST UNet"), ("gmm", "the exact-score model")):
        rows = [r for r in s["objectives"] if r["testbed"] == tb and r["cells"]]
        if not rows:
            continue
        best = max(rows, key=lambda r: (r["better"] - r["worse"], -(r["median_change"] or 0)))
        out.append(f"On {what}, `{best['objective']}` improved FD in {best['better']} of {best['cells']} measured "
                   f"cells and worsened it in {best['worse']} (median {100 * best['median_change']:+.1f}%, best "
                   f"{100 * best['best_change']:+.1f}%)" + (f"; it failed to produce a table in {best['failed']} "
                                                            "more" if best["failed"] else "") + ".")
    opt = next((t for t in s["targets"] if t["target"] == "Default optimiser vs reference Adam"), None)
    if opt is not None:
        out.append(f"Default optimiser vs the paper's Adam: {opt['measured']} ("
                   + ("target met" if opt["met"] else "target missed") + ").")
    return out


def readme_section(s: dict) -> str:
    """The benchmark section of the package README, generated from the results (copy it as is)."""
    sizes = sorted({r["size"] for r in s["runs"].values()})
    devices = sorted({r["device"] for r in s["runs"].values()})
    out = ["<!-- generated by benchmarks/run_all.py from benchmarks/results/*.json; do not edit by hand -->\n",
           "## Benchmarks\n\n",
           f"Sizes: {', '.join(sizes)}; device: {'; '.join(devices)}. Reproduce with the command in "
           "`benchmarks/results/SUMMARY.md`; details and every figure in `benchmarks/results/`.\n\n"]
    rows = [r for r in s["headline"] if r["nfe"] in (5, 10) and r["guidance"] == "1"]
    out.append(writer.markdown_table(
        ["model", "sampler", "NFE", "untuned FD", "TimeTuner FD", "change", "objective"],
        [[r["testbed"], r["sampler"], r["nfe"], r["untuned_fd"], r["best_tuned_fd"],
          None if r["change"] is None else f"{100 * r['change']:+.1f}%", r["best_objective"]] for r in rows]))
    out.append("\n![error along the trajectory](benchmarks/results/trajectory_error.png)\n\n"
               "![FD vs NFE](benchmarks/results/quality_vs_nfe.png)\n\n")
    out += [f"- {x}\n" for x in recommendation(s)]
    out.append("\nTargets: " + "; ".join(
        f"{t['target']}: {verdict_text(t)}" for t in s["targets"])
        + ".\n")
    return "".join(out)


if __name__ == "__main__":
    main(parse_args())
