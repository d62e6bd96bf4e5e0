#!/usr/bin/env python
"""tune="tau" / "grid" / "grid+tau" on the exact GMM: FD to exact samples, held-out endpoint change, cost.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/grid_tuning_gmm.py --family ddim --nfe 10

Writes benchmarks/results/grid_tuning_gmm_<family>_<nfe>.json (and .md). FD: pixel Frechet distance of 4000 samples
from fixed held-out x_T against 8000 exact mixture samples. Variants: the untuned default grid, the dynamic
programme's grid alone (grid_search_evaluations=0), grid (default search budget), grid + tau, tau alone.
"""
import argparse
import copy
import json
import os
import platform
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--family", default="ddim", choices=["ddim", "dpmsolver"])
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--num_samples", type=int, default=256)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args()
    torch.set_num_threads(1)
    import diffusers

    import diffusers_timetuner
    from diffusers_timetuner.calibration import calibrate
    from diffusers_timetuner.denoiser import Denoiser
    from diffusers_timetuner.metrics import pixel_frechet_distance
    from diffusers_timetuner.sampling import sample
    from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler, TimeTunerDPMSolverScheduler
    from diffusers_timetuner.testbeds import load_gmm_pipeline

    pipe = load_gmm_pipeline()
    den = Denoiser(pipe.unet)
    cls = TimeTunerDDIMScheduler if a.family == "ddim" else TimeTunerDPMSolverScheduler
    base = cls.from_config(pipe.scheduler.config)
    held = torch.randn(4000, 1, 8, 8, generator=torch.Generator().manual_seed(99))
    exact = pipe.unet.sample_data(8000, generator=torch.Generator().manual_seed(7)).float().flatten(1)

    def fd(s):
        x = sample(den, copy.deepcopy(s), held, a.nfe)
        return pixel_frechet_distance(x.flatten(1), exact)

    rows = {"untuned": {"fd": fd(base)}}
    variants = [("dp only", "grid", {"grid_search_evaluations": 0}), ("tau", "tau", {}), ("grid", "grid", {}),
                ("grid+tau", "grid+tau", {})]
    for name, tune, extra in variants:
        tick = time.perf_counter()
        res = calibrate(pipe, copy.deepcopy(base), a.nfe, tune=tune, num_samples=a.num_samples,
                        batch_size=a.num_samples, num_validation_samples=a.num_samples, num_heldout_samples=256,
                        progress=False, **extra)
        r = res.reports[a.nfe]
        rows[name] = {"fd": fd(res.scheduler), "forward_samples": r.forward_samples,
                      "seconds": time.perf_counter() - tick, "grid": r.grid, "taus": r.taus,
                      "heldout_endpoint_change": r.heldout["relative_change"], "heldout_se": r.heldout["change_se"],
                      "heldout_untuned": r.heldout["untuned"], "teacher_steps": r.heldout["teacher_steps"],
                      "chosen": (r.grid_tuning or {}).get("chosen"),
                      "search": (r.grid_tuning or {}).get("search"),
                      "teacher_error": (r.grid_tuning or {}).get("teacher_error")}
        print(name, {k: v for k, v in rows[name].items() if k not in ("search", "taus")}, flush=True)
    tau_cost = rows["tau"]["forward_samples"]
    for v in rows.values():
        if "forward_samples" in v:
            v["cost_vs_tau"] = v["forward_samples"] / tau_cost
        v["fd_change_vs_untuned"] = v["fd"] / rows["untuned"]["fd"] - 1
    payload = {"command": f"PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/grid_tuning_gmm.py --family {a.family} "
                          f"--nfe {a.nfe} --num_samples {a.num_samples}",
               "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                            "diffusers_timetuner": diffusers_timetuner.__version__,
                            "python": platform.python_version()},
               "device": "cpu (1 thread)", "fd_samples": 4000, "exact_samples": 8000,
               "calibration_samples": a.num_samples, "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"grid_tuning_gmm_{a.family}_{a.nfe}")
    with open(stem + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    lines = [f"# GMM {a.family}@{a.nfe}: grid tuning", "", f"`{payload['command']}`", "",
             "| method | FD | FD change | held-out endpoint change | forward samples | cost vs tau |",
             "|---|---|---|---|---|---|"]
    for name, v in rows.items():
        lines.append(f"| {name} | {v['fd']:.4f} | {100 * v['fd_change_vs_untuned']:+.1f}% | "
                     + (f"{100 * v['heldout_endpoint_change']:+.1f}%" if "heldout_endpoint_change" in v else "-")
                     + f" | {v.get('forward_samples', '-')} | "
                     + (f"{v['cost_vs_tau']:.2f}x" if "cost_vs_tau" in v else "-") + " |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
