"""Truncation error along the trajectory (the paper's Fig. 2) for the flow-matching samplers and EDM's Heun.

The sibling of trajectory_error.py (DDIM / DPM-Solver on eps models, against a 1000-step DDIM reference) for the
samplers whose grids are not points of one fixed fine schedule:
- FlowMatchEuler and UniPC (flow sigmas, bh2, order 2) on the exact-velocity flow GMM (``flow_gmm``) and on the
  trained 16x16 flow-matching MNIST UNet (``mnist_flow``);
- EDM's Heun (Karras sigmas; n steps = 2 n - 1 network evaluations) on the exact-score eps GMM (``gmm``).

Every sampler draws the same x_T, untuned and with tables tuned per objective (``table_cache.try_calibration``,
data-free as in flow_gmm.py / flow_mnist.py / heun_gmm.py), through the package's sampling loop; its states at the
grid points x~_{s_K}, ..., x~_{s_1} and the final sample are compared with a reference trajectory from the same x_T
that lands exactly on every one of those grid points (``metrics.trajectory_error``: batch mean of the per-sample
L2 norm). The reference is built per grid:
- flow: FlowMatchEuler (float network times, shift 1) on the sampler's own sigmas (UniPC's included: its
  ``sigmas``, not its integer ``timesteps``) with every interval, the last one into sigma = 0 included, split into
  m, 2 m and 4 m equal sub-steps; the reference is the Richardson extrapolation 2 x(4 m) - x(2 m) (Euler is first
  order) and the yardstick of its own error the endpoint L2 distance to the extrapolation 2 x(2 m) - x(m). On the
  trained MNIST UNet the extrapolated reference still converges only at first order (doubling m halves its change;
  the network is not smooth in t at fine scales), hence m = 32 there (at m = 8 the yardstick was 15% of UniPC@10's
  endpoint error, at 32 it is 0.7%). In the medium run the yardstick is at most 1.6% of the untuned endpoint error
  of its cell (flow GMM 1.6%, MNIST 1.4%, Heun 0.04%);
- Heun: Heun itself on Karras grids of f (n - 1) + 1, 2 f (n - 1) + 1 and 4 f (n - 1) + 1 steps, which contain the
  n-step Karras grid (the Karras ramp is uniform), extrapolated as (4 x(4 f) - x(2 f)) / 3 (second order), same
  yardstick. The last step sigma_min -> 0 is a single Euler step in both Heun and its reference (diffusers' Heun).
  Heun's states x = x_0 + sigma eps are compared in the VP scale x / sqrt(1 + sigma^2) of trajectory_error.md.
UniPC's states are the predictor's (the states the network evaluates; its corrector updates each one a step later
with that evaluation). Consistency models take 1-2 steps: there is no trajectory to speak of (cm_gmm.py).

Usage: python -m benchmarks.trajectory_error_flow --quick|--medium [--threads 1] [--testbeds ...] [--families ...]
Testbeds / samplers can run in parallel processes and be merged (same size and seed):
    python -m benchmarks.trajectory_error_flow --medium --testbeds flow_gmm gmm --out-dir /tmp/a
    python -m benchmarks.trajectory_error_flow --medium --testbeds mnist_flow --families flow_euler --out-dir /tmp/b
    python -m benchmarks.trajectory_error_flow --medium --testbeds mnist_flow --families unipc_flow --out-dir /tmp/c
    python -m benchmarks.trajectory_error_flow --medium --merge /tmp/a /tmp/b /tmp/c
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusers_timetuner import TimeTunerFlowMatchEulerDiscreteScheduler
from diffusers_timetuner.metrics import trajectory_error

from . import cli_args, evaluation, families, table_cache, testbeds, writer

NAME = "trajectory_error_flow"
TESTBEDS = ("flow_gmm", "mnist_flow", "gmm")
# (testbed, family, step counts, objectives, step counts of the expensive endpoint objective). Step counts are the
# scheduler's num_inference_steps (Heun: n steps = 2 n - 1 NFE). Heun refuses the paper objective (its predictor
# state is not a grid state); the refusal is recorded in the results, not hidden.
SIZES = {
    "quick": dict(
        n={"flow_gmm": 8, "gmm": 8, "mnist_flow": 4}, refine={"flow_gmm": 2, "gmm": 2, "mnist_flow": 2},
        plan=[("flow_gmm", "flow_euler", [4], ["endpoint"]), ("flow_gmm", "unipc_flow", [4], ["endpoint"]),
              ("gmm", "heun", [3], ["endpoint"]), ("mnist_flow", "flow_euler", [4], ["endpoint"])],
        endpoint_max={"flow_gmm": 20, "gmm": 19, "mnist_flow": 20}),
    # About 5 minutes (exact-model testbeds) plus 25 (MNIST) on one loaded CPU thread; 256 x_T on the GMMs, 128 on
    # MNIST.
    "medium": dict(
        n={"flow_gmm": 256, "gmm": 256, "mnist_flow": 128}, refine={"flow_gmm": 32, "gmm": 8, "mnist_flow": 32},
        plan=[("flow_gmm", "flow_euler", [4, 6, 10, 20], ["endpoint", "teacher_local", "paper"]),
              ("gmm", "heun", [3, 6, 10], ["endpoint", "teacher_local", "paper"]),
              ("flow_gmm", "unipc_flow", [4, 6, 10, 20], ["endpoint", "teacher_local", "paper"]),
              ("mnist_flow", "flow_euler", [4, 6, 10], ["endpoint", "teacher_local", "paper"]),
              ("mnist_flow", "unipc_flow", [4, 6, 10], ["endpoint", "teacher_local", "paper"])],
        endpoint_max={"flow_gmm": 20, "gmm": 19, "mnist_flow": 10},
        # The calibration / validation / held-out sizes of flow_gmm.py, heun_gmm.py and flow_mnist.py, so that
        # calibrate's validation guard can see gains of a few percent (with 32 validation x_T it kept tau = t at
        # flow MNIST Euler@6, where flow_mnist.py's table gains).
        calib={"flow_gmm": dict(num_samples=256, batch_size=256, validation_samples=256, heldout_samples=256),
               "gmm": dict(num_samples=128, batch_size=128, validation_samples=128, heldout_samples=128),
               "mnist_flow": dict(num_samples=64, batch_size=64, validation_samples=64, heldout_samples=128)}),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbeds", nargs="+", choices=TESTBEDS, default=None,
                        help="run only these testbeds' panels (default: all of the size's plan)")
    parser.add_argument("--families", nargs="+", choices=("flow_euler", "unipc_flow", "heun"), default=None,
                        help="run only these samplers' panels (default: all of the size's plan)")
    parser.add_argument("--merge", nargs="+", default=None,
                        help=f"merge the {NAME}.json of these --out-dir folders into --out-dir (no sampling)")
    return cli_args.add_common_args(parser).parse_args(argv)


def nfe_of(family: str, steps: int) -> int:
    return 2 * steps - 1 if family == "heun" else steps


def grid_states(states, grid, sigmas):
    """The states on the grid (the last state at each grid time: Heun visits each time twice, predictor first) and
    the final sample, with their sigmas (consecutive duplicates of the scheduler's sigmas removed)."""
    idx = [i for i in range(len(grid)) if i == len(grid) - 1 or grid[i + 1] != grid[i]] + [len(states) - 1]
    sig = [s for k, s in enumerate(sigmas) if k == 0 or s != sigmas[k - 1]]
    if len(sig) != len(idx):
        raise RuntimeError(f"{len(idx)} grid states but {len(sig)} distinct sigmas")
    return [states[i] for i in idx], sig


def run_sampler(testbed, scheduler, steps, noise, device):
    """(grid states, their sigmas, distinct grid times) of one run of the package's loop."""
    states, times = evaluation.trajectory(testbed, scheduler, steps, noise, device)
    grid = times[:-1]
    g_states, sig = grid_states(states, grid, [float(s) for s in scheduler.sigmas])
    distinct = [t for k, t in enumerate(grid) if k == 0 or t != grid[k - 1]]
    return g_states, sig, distinct + [-1.0]


def flow_reference_states(testbed, nodes, m, noise, device):
    """FlowMatchEuler from the same x_T on `nodes` (s_K, ..., s_1, 0) with m equal sub-steps per interval: its
    states at the nodes."""
    sigmas = [hi + (lo - hi) * k / m for hi, lo in zip(nodes[:-1], nodes[1:]) for k in range(m)]
    ref = TimeTunerFlowMatchEulerDiscreteScheduler(num_train_timesteps=testbed.noise_config["num_train_timesteps"],
                                                   shift=1.0)
    ref.set_timesteps(sigmas=sigmas, device=device)
    states, _ = evaluation.trajectory(testbed, ref, None, noise, device)
    got = [float(s) for s in ref.sigmas[::m]]
    if max(abs(a - b) for a, b in zip(got, nodes)) > 1e-6:
        raise RuntimeError(f"the reference missed a grid sigma: {got} vs {nodes}")
    return states[::m]


def heun_reference_states(testbed, steps, f, noise, device, nodes):
    """Heun (Karras) from the same x_T at f (steps - 1) + 1 steps: its states at the n-step grid's sigmas."""
    ref = families.make_scheduler("heun", testbed.noise_config)
    fine = f * (steps - 1) + 1
    states, sig, _ = run_sampler(testbed, ref, fine, noise, device)
    picked = list(range(0, fine, f)) + [fine]  # grid states s_0 .. s_{n-1}, then the final sample
    got = [sig[k] for k in picked]
    if max(abs(a - b) / max(b, 1e-3) for a, b in zip(got, nodes)) > 1e-4:
        raise RuntimeError(f"the Karras refinement missed a grid sigma: {got} vs {nodes}")
    return [states[k] for k in picked]


def reference(testbed, family, steps, nodes, m, noise, device):
    """Richardson-extrapolated reference states at the grid points, and the yardstick of its own endpoint error."""
    if family == "heun":
        levels = [heun_reference_states(testbed, steps, m * 2 ** k, noise, device, nodes) for k in range(3)]
        order = 2
    else:
        levels = [flow_reference_states(testbed, nodes, m * 2 ** k, noise, device) for k in range(3)]
        order = 1
    w = 2 ** order

    def extrapolate(coarse, fine):
        return [(w * b.double() - a.double()) / (w - 1) for a, b in zip(coarse, fine)]

    ref = extrapolate(levels[1], levels[2])
    prev = extrapolate(levels[0], levels[1])
    yard = {"extrapolated_endpoint_change": evaluation.endpoint_l2(ref[-1], prev[-1]),
            "plain_endpoint_change": evaluation.endpoint_l2(levels[2][-1], levels[1][-1]),
            "sub_steps": [m, 2 * m, 4 * m]}
    return ref, yard


def errors(states, ref, sigmas, family):
    if family == "heun":  # VP scale: x / sqrt(1 + sigma^2)
        scale = [(1.0 + s * s) ** -0.5 for s in sigmas]
        states = [x.double() * c for x, c in zip(states, scale)]
        ref = [x.double() * c for x, c in zip(ref, scale)]
    return [float(e) for e in trajectory_error([x.double() for x in states], [x.double() for x in ref])]


def run_panel(testbed, family, steps, objectives, noise, m, cfg, args, device, run):
    untuned = families.make_scheduler(family, testbed.noise_config)
    u_states, sigmas, times = run_sampler(testbed, untuned, steps, noise, device)
    ref, yard = reference(testbed, family, steps, sigmas, m, noise, device)
    cell = {"family": family, "steps": steps, "nfe": nfe_of(family, steps), "sigmas": sigmas, "times": times,
            "reference": yard, "untuned": errors(u_states, ref, sigmas, family), "tuned": {}, "taus": {},
            "identity": {}, "unavailable": {}}
    untuned_taus = [float(t) for t in untuned.timesteps]
    for obj in objectives:
        if obj == "endpoint" and nfe_of(family, steps) > cfg["endpoint_max"][testbed.name]:  # cost ~ NFE^2
            continue
        if run.out_of_time(f"{testbed.name} {family}@{steps} {obj}"):
            continue
        cal, err = table_cache.try_calibration(
            testbed, family, steps, device, tables_dir=run.tables_dir, use_cache=not args.no_cache, objective=obj,
            calib={**table_cache.calib_for(args.size, testbed.name), **cfg.get("calib", {}).get(testbed.name, {})},
            seed=args.seed, strategy="data_free")
        if cal is None:
            cell["unavailable"][obj] = err
            continue
        tuned = cal.scheduler(testbed, family)
        tuned.set_timesteps(steps)
        fed = [float(t) for t in tuned.timesteps]
        if len(fed) != len(cal.taus) or max(abs(a - b) for a, b in zip(fed, cal.taus)) > 1e-3:
            raise RuntimeError(f"the tuned {family} scheduler does not feed its table at {steps} steps: {fed}")
        t_states, t_sigmas, _ = run_sampler(testbed, tuned, steps, noise, device)
        if t_sigmas != sigmas:
            raise RuntimeError(f"the tuned {family} scheduler integrates on other sigmas than the untuned one")
        cell["tuned"][obj] = errors(t_states, ref, sigmas, family)
        cell["taus"][obj] = cal.taus
        cell["identity"][obj] = all(abs(a - b) < 1e-6 for a, b in zip(cal.taus, untuned_taus))
    return cell


def main(args) -> dict:
    device = cli_args.setup(args)
    run = writer.Run(NAME, args, device)
    if args.merge:
        return merge(run, args.merge)
    cfg = SIZES[args.size]
    chosen = args.testbeds or TESTBEDS
    results = {"settings": {**cfg, "testbeds": list(chosen), "families": args.families}, "panels": {}}
    for tb_name, family, step_list, objectives in cfg["plan"]:
        if tb_name not in chosen or (args.families and family not in args.families):
            continue
        testbed = testbeds.load_testbed(tb_name, device)
        noise = evaluation.seeded_noise(cfg["n"][tb_name], testbed.sample_shape, args.seed + 1000)
        for steps in step_list:
            if run.out_of_time(f"{tb_name} {family}@{steps}"):
                continue
            cli_args.log(f"{NAME}: {tb_name} {family} {steps} steps (NFE {nfe_of(family, steps)}), "
                         f"{noise.shape[0]} x_T")
            cell = run_panel(testbed, family, steps, objectives, noise, cfg["refine"][tb_name], cfg, args, device,
                             run)
            results["panels"].setdefault(f"{tb_name}/{family}", []).append(cell)
            cli_args.log(f"  endpoint L2: untuned {cell['untuned'][-1]:.4g}, "
                         + ", ".join(f"{o} {e[-1]:.4g}" for o, e in cell["tuned"].items())
                         + f"; reference yardstick {cell['reference']['extrapolated_endpoint_change']:.2g}")
    return run.write(results, markdown(results), plot(results))


def merge(run, folders) -> dict:
    payloads = [json.loads((Path(f) / f"{NAME}.json").read_text()) for f in folders]
    if len({(p["size"], p["seed"]) for p in payloads}) != 1:
        raise ValueError(f"--merge needs runs of one size and seed, got {[(p['size'], p['seed']) for p in payloads]}")
    parts = [p["results"] for p in payloads]

    def shared(settings):
        return {k: v for k, v in settings.items() if k not in ("testbeds", "families")}
    if any(shared(p["settings"]) != shared(parts[0]["settings"]) for p in parts):
        raise ValueError("--merge needs runs of the same settings (sizes, plan, reference sub-steps); rerun the "
                         "older part with the current script.")
    testbed_names = sorted({t for p in parts for t in p["settings"]["testbeds"]})
    results = {"settings": {**parts[0]["settings"], "testbeds": testbed_names, "families": None},
               "merged_from": [{"command": p["command"], "wall_time_s": p["wall_time_s"],
                                "skipped_for_budget": p["skipped_for_budget"]} for p in payloads],
               "panels": {k: v for p in parts for k, v in p["panels"].items()}}
    if sum(len(p["panels"]) for p in parts) != len(results["panels"]):
        raise ValueError("--merge: two runs hold the same testbed / sampler panel; merge disjoint runs.")
    cli_args.log(f"{NAME}: merged {len(parts)} runs")
    return run.write(results, markdown(results), plot(results))


def markdown(results) -> str:
    out = ["# Truncation error along the trajectory: flow matching and EDM Heun (paper Fig. 2)\n\n",
           "Per-state L2 distance (batch mean over x_T) of the few-step sampler's grid states and final sample to a "
           "reference from the same x_T that passes through every grid point (refined per grid and Richardson-"
           "extrapolated; see the script's docstring). *yardstick*: endpoint L2 change of that reference when its "
           "sub-steps are halved, an estimate of its own error. *sum*: over all states. *states lower*: states after "
           "x_T at which the tuned error is below the untuned one. *identity*: calibrate's validation guard kept "
           "tau = t. Heun: NFE = 2 n - 1, errors in the VP scale.\n"]
    for key, cells in results["panels"].items():
        objs = sorted({o for c in cells for o in list(c["tuned"]) + list(c["unavailable"])})
        header = ["NFE", "yardstick", "final untuned", *[f"final {o}" for o in objs], "sum untuned",
                  *[f"sum {o}" for o in objs], *[f"states lower {o}" for o in objs]]
        rows = []
        for c in cells:
            def final(o):
                if o in c["unavailable"]:
                    return "not calibrated"
                if o not in c["tuned"]:
                    return None
                e = c["tuned"][o][-1]
                tag = " (identity)" if c["identity"][o] else ""
                return f"{e:.4g} ({100 * writer.rel_change(e, c['untuned'][-1]):+.1f}%){tag}"

            def total(o):
                return sum(c["tuned"][o]) if o in c["tuned"] else None

            def lower(o):  # states after x_T where the tuned error is lower than the untuned one
                if o not in c["tuned"]:
                    return None
                pairs = list(zip(c["tuned"][o], c["untuned"]))[1:]
                return f"{sum(t < u for t, u in pairs)}/{len(pairs)}"
            rows.append([c["nfe"], c["reference"]["extrapolated_endpoint_change"], c["untuned"][-1],
                         *[final(o) for o in objs], sum(c["untuned"]), *[total(o) for o in objs],
                         *[lower(o) for o in objs]])
        out.append(f"\n## {key}\n\n" + writer.markdown_table(header, rows))
        for c in cells:
            out.append(f"- NFE {c['nfe']} per state (sigma {', '.join(f'{s:.3g}' for s in c['sigmas'])}): untuned "
                       f"{', '.join(f'{e:.3g}' for e in c['untuned'])}"
                       + "".join(f"; {o} {', '.join(f'{x:.3g}' for x in e)}" for o, e in c["tuned"].items()) + "\n")
        reasons = {}  # one line per distinct reason
        for c in cells:
            for o, why in c["unavailable"].items():
                reasons.setdefault((o, why), []).append(str(c["nfe"]))
        for (o, why), nfes in reasons.items():
            out.append(f"- {o} at NFE {', '.join(nfes)}: not calibrated, calibrate raised: {why[:300]}\n")
    out.append("\n## Consistency models\n\nThe consistency-model sampler takes 1-2 steps from x_T: there is no "
               "trajectory to compare state by state, so it has no panel here; its tuned vs untuned figures are in "
               "cm_gmm.md.\n")
    for part in results.get("merged_from", []):
        out.append(f"\n- merged from `{part['command']}` ({part['wall_time_s']:.0f} s)"
                   + (f"; skipped for budget: {'; '.join(part['skipped_for_budget'])}"
                      if part["skipped_for_budget"] else ""))
    return "".join(out)


def plot(results):
    keys = list(results["panels"])
    ncols = min(3, max(1, len(keys)))
    nrows = max(1, -(-len(keys) // ncols))
    fig, axes = writer.figure(ncols=ncols, nrows=nrows, size=(4.4, 3.4))
    styles = {"endpoint": "-", "teacher_local": "-.", "paper": ":"}
    for k, key in enumerate(keys):
        ax = axes[k // ncols][k % ncols]
        for j, c in enumerate(results["panels"][key]):
            color = f"C{j}"
            # from the first step on (x_T itself is shared: error 0, off a log axis)
            x = (c["sigmas"] if c["family"] != "heun" else [s / (1 + s) for s in c["sigmas"]])[1:]
            ax.plot(x, c["untuned"][1:], "--", color=color, marker="x", ms=3, lw=0.9, label=f"NFE {c['nfe']} untuned")
            for o, e in c["tuned"].items():
                ax.plot(x, e[1:], styles.get(o, "-"), color=color, marker=".", ms=3, label=f"NFE {c['nfe']} {o}")
        ax.set_title(key, fontsize=9)
        heun = key.endswith("/heun")
        ax.set_xlabel(("sigma_i / (1 + sigma_i)" if heun else "sigma_i") + " (sampling runs left to right)",
                      fontsize=8)
        ax.set_ylabel("L2 to reference")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.legend(fontsize=5, ncol=2)
    for k in range(len(keys), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(parse_args())
