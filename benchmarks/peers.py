"""Peers on the same model and seeds.

1. Optimisers: the paper's reference optimiser (Adam, lr 2e-3, 500 mini-batches per step, as in the authors' code)
   vs the package's default optimiser: agreement of the tuned times (max |r_default - r_adam| with r = tau / t in
   the reference code's continuous time (t + 1) / T), model evaluations (forward / backward), wall time, and the
   quality of each table on the same samples.
2. The training-free Time-Shift sampler of Li et al. (ICLR 2024, `benchmarks/time_shift.py`) vs untuned DDIM vs
   TimeTuner-DDIM, same x_T and labels. The Time-Shift window / cutoff are swept and every setting is reported; its
   best setting is chosen on the evaluation samples themselves (favourable to the peer).

Usage: python -m benchmarks.peers --quick|--medium|--full [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import inspect

import torch
from diffusers import DDIMScheduler

from . import cli_args, evaluation, families, table_cache, testbeds, writer
from .quality_vs_nfe import Evaluator
from .time_shift import TimeShiftDDIM

NAME = "peers"
SIZES = {
    "quick": dict(testbeds={"gmm": 32}, floor_steps=20, opt_nfes=[5], opt_objectives=["paper"], ts_nfes=[5],
                  ts_settings=[(10, 300)], tt_objectives=["paper"], batch=256),
    # Medium: the trained MNIST UNet too, at the Time-Shift comparison of DDIM@10 only (200 samples; the TimeTuner
    # tables are quality_vs_nfe's, same settings, from the cache) - its optimiser comparison is GPU work.
    "medium": dict(testbeds={"gmm": 2000, "mnist": 200}, floor_steps=1000, opt_nfes=[5, 10], opt_objectives=["paper"],
                   ts_nfes=[5, 10, 20], ts_settings=[(10, 300), (20, 300), (40, 200), (10, 550)],
                   tt_objectives=list(table_cache.OBJECTIVES), batch=500,
                   overrides={"mnist": dict(opt_nfes=[], ts_nfes=[10], tt_objectives=["teacher_local", "paper"])}),
    "full": dict(testbeds={"gmm": 10000, "mnist": 5000}, floor_steps=1000, opt_nfes=[5, 10],
                 opt_objectives=["paper", "paper_x0"],
                 ts_nfes=[5, 10, 20], ts_settings=[(10, 300), (20, 300), (40, 200), (10, 550), (40, 550)],
                 tt_objectives=list(table_cache.OBJECTIVES), batch=5000),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return cli_args.add_common_args(parser).parse_args(argv)


def r_values(taus, grid, T=1000):
    """tau_i / t_i in the reference code's continuous time (t + 1) / T."""
    return [((tau + 1) / T) / ((t + 1) / T) for tau, t in zip(taus, grid)]


def counts(report):
    """Model evaluations (samples through the network, forward and backward separately) and wall time of one
    `calibrate` call, as its report states them (teacher, roll-outs and the held-out check included)."""
    return {"forward": table_cache.report_count(report, "forward_samples"),
            "backward": table_cache.report_count(report, "backward_samples") or 0.0,
            "wall_time_s": table_cache.report_count(report, "wall_time_s")}


def compare_optimizers(testbed, n, cfg, evaluator, args, device, run):
    out = {}
    for obj in cfg["opt_objectives"]:
        for nfe in cfg["opt_nfes"]:
            if run.out_of_time(f"{testbed.name} optimisers {obj} NFE={nfe}"):
                continue
            cli_args.log(f"{NAME}: {testbed.name} optimisers, {obj}, DDIM NFE={nfe}")
            tried = {opt: table_cache.try_calibration(
                testbed, "ddim", nfe, device, tables_dir=run.tables_dir, use_cache=not args.no_cache,
                objective=obj, optimizer=opt, calib=table_cache.calib_for(args.size, testbed.name),
                seed=args.seed) for opt in (table_cache.DEFAULT_OPTIMIZER, table_cache.REFERENCE_OPTIMIZER)}
            if any(cal is None for cal, _ in tried.values()):
                out[f"{obj}_n{nfe}"] = {"failed": {o: e for o, (c, e) in tried.items() if c is None}}
                continue
            cals = {opt: cal for opt, (cal, _) in tried.items()}
            entry = {}
            for opt, cal in cals.items():
                x = evaluation.generate(testbed, cal.scheduler(testbed, "ddim"), nfe, n, args.seed, device,
                                        batch_size=cfg["batch"], family="ddim")
                entry[opt] = {"taus": cal.taus, "grid": cal.grid, "r": r_values(cal.taus, cal.grid),
                              **counts(cal.report), "quality": evaluator(x)}
            d, a = entry[table_cache.DEFAULT_OPTIMIZER], entry[table_cache.REFERENCE_OPTIMIZER]
            evals_d = (d["forward"] or 0) + (d["backward"] or 0)
            evals_a = (a["forward"] or 0) + (a["backward"] or 0)
            entry["max_abs_r_difference"] = max(abs(x - y) for x, y in zip(d["r"], a["r"]))
            entry["evaluation_ratio_adam_over_default"] = (evals_a / evals_d) if evals_d else None
            entry["wall_ratio_adam_over_default"] = (a["wall_time_s"] / d["wall_time_s"]) \
                if d["wall_time_s"] and a["wall_time_s"] else None
            out[f"{obj}_n{nfe}"] = entry
    return out


def ddim_scheduler(testbed):
    """A plain diffusers DDIMScheduler with the benchmark's DDIM config (TimeTuner's untuned DDIM is bit-identical)."""
    config = dict(families.make_scheduler("ddim", testbed.noise_config).config)
    params = inspect.signature(DDIMScheduler.__init__).parameters
    return DDIMScheduler(**{k: v for k, v in config.items() if k in params})


@torch.no_grad()
def time_shift_samples(testbed, ts, nfe, n, seed, device, batch):
    noise = evaluation.seeded_noise(n, testbed.sample_shape, seed)
    cond_all = testbed.labels_for(n, "cpu")
    den = testbed.denoiser(1.0)
    out, shifts = [], []
    for start in range(0, n, batch):
        cond = None if cond_all is None else {k: v[start:start + batch].to(device) for k, v in cond_all.items()}
        out.append(ts.sample(den, noise[start:start + batch].to(device), nfe, cond).float().cpu())
        shifts.append(torch.tensor(ts.last_shifts, dtype=torch.float64))  # (steps, B)
    shifts = torch.cat(shifts, dim=1)
    return torch.cat(out), shifts


def compare_time_shift(testbed, n, cfg, evaluator, args, device, run):
    out = {}
    for nfe in cfg["ts_nfes"]:
        if run.out_of_time(f"{testbed.name} time-shift NFE={nfe}"):
            continue
        cli_args.log(f"{NAME}: {testbed.name} time-shift vs TimeTuner, DDIM NFE={nfe}")
        untuned = evaluation.generate(testbed, families.make_scheduler("ddim", testbed.noise_config), nfe, n,
                                      args.seed, device, batch_size=cfg["batch"], family="ddim")
        entry = {"untuned": evaluator(untuned), "timetuner": {}, "time_shift": {}}
        # Sanity: with window 0 the Time-Shift loop is plain DDIM (must match the shared loop).
        ts0, _ = time_shift_samples(testbed, TimeShiftDDIM(ddim_scheduler(testbed), 0, 0), nfe, min(n, 64),
                                    args.seed, device, cfg["batch"])
        entry["time_shift_window0_max_abs_diff_vs_untuned"] = float((ts0 - untuned[: ts0.shape[0]]).abs().max())
        for obj in cfg["tt_objectives"]:
            cal, err = table_cache.try_calibration(testbed, "ddim", nfe, device, tables_dir=run.tables_dir,
                                                   use_cache=not args.no_cache, objective=obj, seed=args.seed,
                                                   calib=table_cache.calib_for(args.size, testbed.name))
            if cal is None:
                entry.setdefault("timetuner_failed", {})[obj] = err
                continue
            x = evaluation.generate(testbed, cal.scheduler(testbed, "ddim"), nfe, n, args.seed, device,
                                    batch_size=cfg["batch"], family="ddim")
            entry["timetuner"][obj] = evaluator(x)
        for w, c in cfg["ts_settings"]:
            ts = TimeShiftDDIM(ddim_scheduler(testbed), window=w, cutoff=c)
            x, shifts = time_shift_samples(testbed, ts, nfe, n, args.seed, device, cfg["batch"])
            grid = torch.tensor([float(t) for t in ddim_scheduler_grid(testbed, nfe)], dtype=torch.float64)
            mean_shift = (shifts - grid[:, None]).mean(dim=1).tolist()
            entry["time_shift"][f"w{w}_c{c}"] = {"window": w, "cutoff": c, **evaluator(x),
                                                 "mean_shift_per_step": mean_shift}
        best = min(entry["time_shift"], key=lambda k: entry["time_shift"][k]["fd"])
        entry["time_shift_best"] = best
        out[str(nfe)] = entry
    return out


def ddim_scheduler_grid(testbed, nfe):
    s = ddim_scheduler(testbed)
    s.set_timesteps(nfe)
    return s.timesteps.tolist()


def main(args) -> dict:
    device = cli_args.setup(args)
    run = writer.Run(NAME, args, device)
    cfg = SIZES[args.size]
    results = {"settings": cfg, "testbeds": {}}
    for tb_name, n in cfg["testbeds"].items():
        testbed = testbeds.load_testbed(tb_name, device)
        tb_cfg = {**cfg, **cfg.get("overrides", {}).get(tb_name, {})}  # per-testbed sizes (medium MNIST)
        floor = None
        if testbed.exact_sampler is not None:  # endpoint L2 against the many-step DDIM sample (cheap on the GMM)
            floor = evaluation.generate(testbed, families.make_scheduler("ddim", testbed.noise_config),
                                        cfg["floor_steps"], n,
                                        args.seed, device, batch_size=cfg["batch"], family="ddim")
        evaluator = Evaluator(testbed, n, args.seed, floor)
        results["testbeds"][tb_name] = {
            "n_samples": n,
            "optimizers": compare_optimizers(testbed, n, tb_cfg, evaluator, args, device, run),
            "time_shift": compare_time_shift(testbed, n, tb_cfg, evaluator, args, device, run),
        }
    return run.write(results, markdown(results), plot(results))


def markdown(results) -> str:
    out = ["# Peers: reference optimiser, Time-Shift sampler\n"]
    for tb, r in results["testbeds"].items():
        out.append(f"\n## {tb} ({r['n_samples']} samples)\n\n### Default optimiser vs the paper's Adam (DDIM)\n\n")
        rows = []
        for key, e in r["optimizers"].items():
            if "failed" in e:
                rows.append([key, f"calibration failed: {e['failed']}"] + [None] * 9)
                continue
            d, a = e[table_cache.DEFAULT_OPTIMIZER], e[table_cache.REFERENCE_OPTIMIZER]
            rows.append([key, e["max_abs_r_difference"], d["forward"], d["backward"], a["forward"], a["backward"],
                         e["evaluation_ratio_adam_over_default"], d["wall_time_s"], a["wall_time_s"],
                         d["quality"]["fd"], a["quality"]["fd"]])
        out.append(writer.markdown_table(
            ["objective/NFE", "max abs dr", "default fwd", "default bwd", "adam fwd", "adam bwd", "evals adam/default",
             "default s", "adam s", "FD default", "FD adam"], rows))
        out.append("\n### Time-Shift sampler vs TimeTuner (DDIM, same x_T)\n\n")
        rows = []
        for nfe, e in r["time_shift"].items():
            best = e["time_shift"][e["time_shift_best"]]
            tt = {o: v["fd"] for o, v in e["timetuner"].items()}
            best_tt = min(tt, key=tt.get) if tt else None
            rows.append([nfe, e["untuned"]["fd"], f"{best['fd']:.4g} ({e['time_shift_best']})",
                         None if best_tt is None else f"{tt[best_tt]:.4g} ({best_tt})",
                         e["time_shift_window0_max_abs_diff_vs_untuned"]])
        out.append(writer.markdown_table(
            ["NFE", "DDIM untuned FD", "Time-Shift best FD (setting)", "TimeTuner best FD (objective)",
             "TS w=0 vs DDIM max abs diff"], rows))
        rows = [[nfe, k, v["fd"]] for nfe, e in r["time_shift"].items() for k, v in e["time_shift"].items()]
        out.append("\nEvery Time-Shift setting:\n\n" + writer.markdown_table(["NFE", "setting", "FD"], rows))
    return "".join(out)


def plot(results):
    tbs = list(results["testbeds"])
    fig, axes = writer.figure(ncols=2, nrows=len(tbs), size=(4.4, 3.2))
    for r, tb in enumerate(tbs):
        res = results["testbeds"][tb]
        ax = axes[r][0]
        for key, e in res["optimizers"].items():
            if "failed" in e:
                continue
            for opt, style in ((table_cache.DEFAULT_OPTIMIZER, "o-"), (table_cache.REFERENCE_OPTIMIZER, "x--")):
                ax.plot(range(len(e[opt]["r"])), e[opt]["r"], style, label=f"{key} {opt}")
        ax.set_title(f"{tb}: tuned r = tau/t per step", fontsize=9)
        if not res["optimizers"]:  # e.g. medium MNIST: the optimiser comparison is not run at this size
            ax.text(0.5, 0.5, "optimiser comparison\nnot run at this size", ha="center", va="center", fontsize=9)
            ax.set_axis_off()
        else:
            ax.axhline(1.0, color="gray", lw=0.5)
            ax.set_xlabel("step")
            ax.legend(fontsize=6)
        ax = axes[r][1]
        nfes = [int(k) for k in res["time_shift"]]
        ts = res["time_shift"]
        ax.plot(nfes, [ts[str(k)]["untuned"]["fd"] for k in nfes], "o--", color="tab:red", label="DDIM")
        ax.plot(nfes, [ts[str(k)]["time_shift"][ts[str(k)]["time_shift_best"]]["fd"] for k in nfes], "s-",
                color="tab:orange", label="Time-Shift (best setting)")
        objs = sorted({o for e in ts.values() for o in e["timetuner"]})
        colors = {"paper": "tab:blue", "paper_x0": "tab:brown", "teacher_local": "tab:green", "endpoint": "tab:purple"}
        for o in objs:
            ax.plot(nfes, [ts[str(k)]["timetuner"].get(o, {}).get("fd", float("nan")) for k in nfes], "o-",
                    color=colors.get(o, "k"), label=f"TimeTuner {o}")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("FD")
        ax.set_title(f"{tb}: DDIM peers", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(parse_args())
