"""The tau table: TimeTuner's tuned timesteps as plain, validated JSON.

A table maps a step count n (``num_inference_steps``) to one tuned timestep tau_i per model evaluation, in sampling
order, in the units of ``scheduler.timesteps`` (what the network receives). It lives in three scheduler config keys:

- ``tuned_timesteps``: ``{"<n>": [tau_K, ..., tau_1]}``;
- ``tuned_grids``: ``{"<n>": [t_K, ..., t_1]}``, the grid the table was tuned on (optional per n, checked by the
  scheduler at ``set_timesteps``);
- ``tuning_info``: ``{"<n>": {...}}``, free-form JSON provenance (objective, strategy, guidance scale, model id...).
  ``tuning_info["<n>"]["learned_grid"] = true`` marks ``tuned_grids["<n>"]`` as a *learned* grid: plain
  ``set_timesteps(n)`` then samples on it (instead of refusing the scheduler's own, different grid).

This module only parses, validates and normalises those values (string keys, Python floats); it imports neither
torch models nor diffusers, so calibration and hub code can use it on its own.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "LEARNED_GRID_KEY",
    "TAU_ATOL",
    "TAU_RTOL",
    "TauTable",
    "TunedTimestepsWarning",
    "check_made_for",
    "normalize_step_key",
    "normalize_tuning_config",
    "parse_tau_tables",
    "scheduler_fingerprint",
    "timestep_tolerance",
    "timesteps_close",
    "matching_indices",
    "HeldOutResult",
    "HELD_OUT_KEY",
]

# Two timesteps are "the same" when |a - b| <= TAU_ATOL + TAU_RTOL * max(|a|, |b|). At t ~ 1000 that is ~1e-3:
# 16 float32 ulps, so a tau that went through float32 <-> float64 <-> JSON still matches, while distinct taus of a
# table must differ by more than that (the duplicate check uses the same rule as the scheduler's step lookup).
TAU_RTOL = 1e-6
TAU_ATOL = 1e-5

# tuning_info[n][LEARNED_GRID_KEY] = True: the recorded grid was learned, and set_timesteps(n) samples on it.
LEARNED_GRID_KEY = "learned_grid"

_CONFIG_KEYS = ("tuned_timesteps", "tuned_grids", "tuning_info")
# The largest finite float32: `scheduler.timesteps` holds the taus in float32, so a larger value would become inf.
FLOAT32_MAX = 3.4028234663852886e38
_STEP_KEY_RE = re.compile(r"^[1-9][0-9]*$")


class TunedTimestepsWarning(UserWarning):
    """A tau table is valid but suspicious (e.g. a tau outside the model's training range)."""


def timestep_tolerance(a: float, b: float) -> float:
    """The tolerance below which timesteps `a` and `b` count as equal (see `TAU_ATOL`, `TAU_RTOL`)."""
    return TAU_ATOL + TAU_RTOL * max(abs(a), abs(b))


def timesteps_close(a: float, b: float) -> bool:
    """Whether two timesteps are the same step under the scheduler's lookup tolerance."""
    return abs(a - b) <= timestep_tolerance(a, b)


def matching_indices(values, t: float) -> np.ndarray:
    """Indices of ``values`` (array-like) that are the same timestep as ``t`` (:func:`timesteps_close`, vectorised)."""
    values = np.asarray(values, dtype=np.float64)
    tol = TAU_ATOL + TAU_RTOL * np.maximum(np.abs(values), abs(t))
    return np.flatnonzero(np.abs(values - t) <= tol)


# Key of `tuning_info["<n>"]` holding the held-out measurement calibration made (see `HeldOutResult`).
HELD_OUT_KEY = "heldout"


@dataclass(frozen=True)
class HeldOutResult:
    """The held-out measurement of one table: its error against the untuned sampler's on fresh x_T.

    Calibration writes it into `tuning_info["<n>"]["heldout"]` (`to_json`); the hub reads it back (`from_json`) to
    show it and to refuse pushing a table that made things worse.

    Args:
        metric (`str`): what the verdict compares (`"endpoint_mse"`, `"energy_distance"`, ...).
        untuned, tuned (`float`): the error without and with the table.
        change_se (`float`, *optional*): the paired standard error of `tuned - untuned`.
        relative_change (`float`, *optional*): `(tuned - untuned) / |untuned|` as recorded.
        endpoint_mse_untuned, endpoint_mse_tuned (`float`, *optional*): the endpoint MSE pair, recorded whatever the
            verdict's metric.
    """

    metric: str
    untuned: float
    tuned: float
    change_se: float | None = None
    relative_change: float | None = None
    endpoint_mse_untuned: float | None = None
    endpoint_mse_tuned: float | None = None

    @property
    def worse_than_untuned(self) -> bool:
        return self.tuned > self.untuned

    def to_json(self) -> dict:
        """The recorded form: the endpoint MSE pair, relative change and SE; for another metric also `metric`,
        `untuned` and `tuned` (the form the bundled tables hold)."""
        out = {"endpoint_mse_tuned": self.endpoint_mse_tuned, "endpoint_mse_untuned": self.endpoint_mse_untuned,
               "relative_change": self.relative_change, "change_se": self.change_se}
        if self.metric != "endpoint_mse":
            out.update(metric=self.metric, untuned=self.untuned, tuned=self.tuned)
        return out

    @classmethod
    def from_json(cls, held: Any) -> "HeldOutResult | None":
        """Read a recorded measurement: the explicit form (`metric`, `untuned`, `tuned`) or the metric-named pair
        `{"<metric>_untuned": u, "<metric>_tuned": t}` (e.g. `endpoint_mse_*`); None for anything else."""
        if not isinstance(held, Mapping):
            return None
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        opt = lambda k: float(held[k]) if number(held.get(k)) else None  # noqa: E731
        common = dict(change_se=opt("change_se"), relative_change=opt("relative_change"),
                      endpoint_mse_untuned=opt("endpoint_mse_untuned"), endpoint_mse_tuned=opt("endpoint_mse_tuned"))
        if number(held.get("untuned")) and number(held.get("tuned")):
            return cls(str(held.get("metric", "error")), float(held["untuned"]), float(held["tuned"]), **common)
        for key in sorted(held):
            if key.endswith("_untuned") and number(held[key]):
                metric = key[: -len("_untuned")]
                if number(held.get(f"{metric}_tuned")):
                    return cls(metric, float(held[key]), float(held[f"{metric}_tuned"]), **common)
        return None


@dataclass(frozen=True)
class TauTable:
    """One validated tau table.

    Args:
        num_inference_steps (`int`): the step count n the table is for.
        taus (`tuple[float, ...]`): tau_i per model evaluation, in sampling order (tau_K first).
        grid (`tuple[float, ...]`, *optional*): the grid t_K, ..., t_1 the table was tuned on; `None` = not recorded
            (the table applies to whatever grid the scheduler config produces).
        info (`dict`, *optional*): JSON provenance of the table.
    """

    num_inference_steps: int
    taus: tuple[float, ...]
    grid: tuple[float, ...] | None = None
    info: dict | None = field(default=None, compare=False, hash=False)

    @property
    def n(self) -> int:
        """Short name for `num_inference_steps`."""
        return self.num_inference_steps

    @property
    def key(self) -> str:
        """The table's key in the config (`str(num_inference_steps)`)."""
        return str(self.num_inference_steps)

    @property
    def learned_grid(self) -> list[int] | None:
        """The recorded grid when it was learned (``info["learned_grid"]``): `set_timesteps(n)` samples on it."""
        if self.grid is None or not (self.info or {}).get(LEARNED_GRID_KEY):
            return None
        return [int(round(t)) for t in self.grid]


def normalize_step_key(key: Any, *, config_key: str = "tuned_timesteps") -> str:
    """Return a step-count key as the string JSON stores (``10``, ``"10"`` -> ``"10"``).

    Raises:
        ValueError: if `key` is not a positive integer (or the decimal string of one).
    """
    if isinstance(key, bool):
        ok = False
    elif isinstance(key, numbers.Integral):
        ok = int(key) > 0
        key = str(int(key))
    elif isinstance(key, str):
        ok = bool(_STEP_KEY_RE.match(key.strip()))
        key = key.strip()
    else:
        ok = False
    if not ok:
        raise ValueError(
            f"`{config_key}` key {key!r} is not a step count: keys must be the number of inference steps the table is "
            f"for, a positive integer or its decimal string (e.g. {{\"10\": [...]}})."
        )
    return key


def _as_number_list(values: Any, *, what: str) -> list[float]:
    """Convert a sequence of real numbers (list, tuple, numpy array, tensor) to Python floats."""
    if isinstance(values, (str, bytes, Mapping)):
        raise ValueError(f"{what} must be a list of numbers, got {type(values).__name__}.")
    if hasattr(values, "tolist"):  # numpy arrays and torch tensors, without importing either
        values = values.tolist()
    if not isinstance(values, Sequence):
        raise ValueError(f"{what} must be a list of numbers, got {type(values).__name__}.")
    out = []
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"{what}[{j}] = {v!r} is not a real number; the table holds plain numbers only.")
        out.append(float(v))
    return out


def _validate_taus(n: int, taus: list[float], *, num_train_timesteps: int | None, num_evaluations=None) -> None:
    key = f"`tuned_timesteps[\"{n}\"]`"
    m = n if num_evaluations is None else num_evaluations(n)
    if len(taus) != m:
        raise ValueError(
            f"{key} has {len(taus)} values but {n} inference steps make {m} model evaluations: give exactly one tau "
            "per model evaluation, in sampling order (or store the table under the step count it was tuned for)."
        )
    bad = [(j, v) for j, v in enumerate(taus) if not math.isfinite(v) or abs(v) > FLOAT32_MAX]
    if bad:
        raise ValueError(
            f"{key} has non-finite values at (index, value) {bad}: every tau must be a finite number that float32 "
            "(the dtype of `scheduler.timesteps`) can hold."
        )
    neg = [(j, v) for j, v in enumerate(taus) if v < 0]
    if neg:
        raise ValueError(
            f"{key} has negative values at (index, value) {neg}: tau is a timestep in the units of "
            "`scheduler.timesteps` and must be >= 0."
        )
    for a in range(len(taus)):
        for b in range(a + 1, len(taus)):
            if timesteps_close(taus[a], taus[b]):
                raise ValueError(
                    f"{key} has duplicate values: tau[{a}] = {taus[a]!r} and tau[{b}] = {taus[b]!r} are equal within "
                    f"the lookup tolerance (|a - b| <= {TAU_ATOL} + {TAU_RTOL} * |t|); the scheduler finds the step "
                    "from the tau the pipeline passes back, so every tau of a table must be distinct."
                )
    if num_train_timesteps is not None:
        hi = num_train_timesteps - 1
        out = [(j, v) for j, v in enumerate(taus) if v > hi]
        if out:
            raise ValueError(
                f"{key} has values outside the training range [0, {hi}] at (index, value) {out}; the network was "
                "never trained on these timesteps. Keep every tau within [0, num_train_timesteps - 1]."
            )
    # Tuned taus of neighbouring steps may cross (a calibrated table can hold [..., 400.0, 417.7, ...]), so only a
    # table that runs from small to large timesteps as a whole (first tau <= last) is refused as out of order.
    if len(taus) > 1 and taus[0] <= taus[-1]:
        raise ValueError(
            f"{key} is not in sampling order: the first tau ({taus[0]!r}) is not above the last ({taus[-1]!r}). Give "
            "the taus from the first model evaluation (noisiest, largest timestep) to the last."
        )


def _validate_grid(key: str, grid: list[float], *, num_train_timesteps: int | None) -> None:
    what = f"`tuned_grids[\"{key}\"]`"
    if not all(math.isfinite(v) for v in grid):
        raise ValueError(f"{what} has non-finite values: {grid}.")
    # Heun-type samplers evaluate twice at a grid point, so their grid repeats a time once; nothing may go upwards.
    rises = any(grid[j] < grid[j + 1] for j in range(len(grid) - 1))
    triples = any(grid[j] == grid[j + 1] == grid[j + 2] for j in range(len(grid) - 2))
    if rises or triples or (len(grid) > 1 and grid[0] == grid[-1]):
        raise ValueError(
            f"{what} must be strictly descending (t_K > ... > t_1; a sampler with two evaluations per step may repeat "
            f"a time once), got {grid}."
        )
    hi = None if num_train_timesteps is None else num_train_timesteps - 1
    if grid and (grid[-1] < 0 or (hi is not None and grid[0] > hi)):
        raise ValueError(f"{what} must lie in [0, {hi if hi is not None else 'num_train_timesteps - 1'}], got {grid}.")


def _as_step_dict(value: Any, config_key: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"`{config_key}` must be a dict {{\"<num_inference_steps>\": ...}} (or None), got {type(value).__name__}."
        )
    out: dict[str, Any] = {}
    for k, v in value.items():
        nk = normalize_step_key(k, config_key=config_key)
        if nk in out:
            raise ValueError(f"`{config_key}` has the step count {nk} twice (as {k!r} and another key); keep one.")
        out[nk] = v
    return out


def _number_or_int(v: float) -> float | int:
    """Grid values: ints stay ints in JSON (999, not 999.0), fractional grids (Euler linspace) stay floats."""
    return int(v) if float(v).is_integer() else float(v)


def parse_tau_tables(
    tuned_timesteps: Mapping | None,
    tuned_grids: Mapping | None = None,
    tuning_info: Mapping | None = None,
    *,
    num_train_timesteps: int | None = None,
    num_evaluations: Callable[[int], int] | None = None,
) -> dict[int, TauTable]:
    """Validate the three config values and return one `TauTable` per step count.

    Args:
        tuned_timesteps: ``{n: [tau per model evaluation]}``; `None` or ``{}`` means untuned.
        tuned_grids: ``{n: [grid timestep per model evaluation]}``, only for step counts that have a table.
        tuning_info: ``{n: {provenance}}``, JSON-serialisable dicts, only for step counts that have a table.
        num_train_timesteps: if given, taus above ``num_train_timesteps - 1`` trigger a `TunedTimestepsWarning`.
        num_evaluations: model evaluations (taus) per table of n steps; default n (Heun: 2n - 1).

    Raises:
        ValueError: one message per problem (bad key, length, non-finite, negative or duplicate tau, grid length or
            values, info not JSON, grid/info for a step count without a table).
    """
    tables_in = _as_step_dict(tuned_timesteps, "tuned_timesteps") or {}
    grids_in = _as_step_dict(tuned_grids, "tuned_grids") or {}
    infos_in = _as_step_dict(tuning_info, "tuning_info") or {}
    for config_key, d in (("tuned_grids", grids_in), ("tuning_info", infos_in)):
        orphans = sorted(int(k) for k in set(d) - set(tables_in))
        if orphans:
            raise ValueError(
                f"`{config_key}` has entries for step counts {orphans} that have no table in `tuned_timesteps`; "
                "add the tables or remove those entries."
            )

    tables: dict[int, TauTable] = {}
    for key in sorted(tables_in, key=int):
        n = int(key)
        taus = _as_number_list(tables_in[key], what=f"`tuned_timesteps[\"{key}\"]`")
        _validate_taus(n, taus, num_train_timesteps=num_train_timesteps, num_evaluations=num_evaluations)
        grid = None
        if grids_in.get(key) is not None:
            grid = _as_number_list(grids_in[key], what=f"`tuned_grids[\"{key}\"]`")
            if len(grid) != len(taus):
                raise ValueError(
                    f"`tuned_grids[\"{key}\"]` has {len(grid)} values but `tuned_timesteps[\"{key}\"]` has "
                    f"{len(taus)}: "
                    "record the grid the table was tuned on, one grid timestep per tau."
                )
            _validate_grid(key, grid, num_train_timesteps=num_train_timesteps)
            grid = tuple(_number_or_int(v) for v in grid)
        info = infos_in.get(key)
        if info is not None:
            if not isinstance(info, Mapping):
                raise ValueError(f"`tuning_info[\"{key}\"]` must be a dict of JSON values, got {type(info).__name__}.")
            try:
                info = json.loads(json.dumps(dict(info), allow_nan=False))
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"`tuning_info[\"{key}\"]` is not plain JSON ({err}); store numbers, strings, lists and dicts "
                    "(convert tensors with `.tolist()`)."
                ) from None
        if info is not None and info.get(LEARNED_GRID_KEY):
            if grid is None or any(float(v) != int(v) for v in grid) or len(set(grid)) != len(grid):
                raise ValueError(
                    f"`tuning_info[\"{key}\"]` marks a learned grid, but `tuned_grids[\"{key}\"]` is "
                    f"{list(grid) if grid is not None else None}: a learned grid is recorded there as strictly "
                    "descending integers, one per tau. Record it, or drop the mark."
                )
        tables[n] = TauTable(num_inference_steps=n, taus=tuple(taus), grid=grid, info=info)
    return tables


def normalize_tuning_config(
    tuned_timesteps: Mapping | None,
    tuned_grids: Mapping | None = None,
    tuning_info: Mapping | None = None,
    *,
    num_train_timesteps: int | None = None,
    num_evaluations: Callable[[int], int] | None = None,
) -> tuple[dict[int, TauTable], dict | None, dict | None, dict | None]:
    """Validate the three config values and return ``(tables, tuned_timesteps, tuned_grids, tuning_info)``.

    The three dicts are the JSON form stored in the scheduler config: string keys, lists of Python floats (grids keep
    integral values as ints). `None` stays `None` and an empty dict stays empty, so an untuned config round-trips
    unchanged.
    """
    tables = parse_tau_tables(
        tuned_timesteps, tuned_grids, tuning_info, num_train_timesteps=num_train_timesteps,
        num_evaluations=num_evaluations,
    )
    norm_taus = None if tuned_timesteps is None else {t.key: list(t.taus) for t in tables.values()}
    norm_grids = None
    if tuned_grids is not None:
        norm_grids = {t.key: list(t.grid) for t in tables.values() if t.grid is not None}
    norm_info = None
    if tuning_info is not None:
        norm_info = {t.key: t.info for t in tables.values() if t.info is not None}
    return tables, norm_taus, norm_grids, norm_info


# ---- provenance: which scheduler a table was made for ----------------------------------------------------------------
# Recorded in ``tuning_info["<n>"]["made_for"]`` when a table is created with provenance (calibration does this):
# the scheduler class, its noise schedule, its prediction type and the settings that shape its grid. A table read
# back into a scheduler that differs in any recorded value is refused; a table without the record (hand-written,
# or made before it existed) is not checked.
MADE_FOR_KEY = "made_for"
MADE_FOR_CONFIG_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
)


def scheduler_fingerprint(class_name: str, config: Mapping) -> dict:
    """What a table records about the scheduler it was made for (class name + the config keys that it has)."""
    out: dict[str, Any] = {"class_name": class_name}
    for k in MADE_FOR_CONFIG_KEYS:
        if k in config:
            v = config[k]
            out[k] = v.tolist() if hasattr(v, "tolist") else (list(v) if isinstance(v, tuple) else v)
    return json.loads(json.dumps(out))


def check_made_for(tables: Mapping[int, TauTable], class_name: str, config: Mapping) -> None:
    """Raise ValueError naming every recorded value that differs from the scheduler the tables are loaded into."""
    here = scheduler_fingerprint(class_name, config)
    for n, table in sorted(tables.items()):
        recorded = (table.info or {}).get(MADE_FOR_KEY)
        if recorded is None:
            continue  # unknown provenance: not checked
        if not isinstance(recorded, Mapping):
            raise ValueError(f"`tuning_info[\"{n}\"][\"{MADE_FOR_KEY}\"]` must be a dict, got {type(recorded).__name__}.")
        diffs = [
            f"{k}: table {recorded[k]!r}, scheduler {here.get(k)!r}"
            for k in sorted(recorded)
            if k in here and recorded[k] != here[k]
        ]
        missing = [k for k in sorted(recorded) if k not in here]
        diffs += [f"{k}: table {recorded[k]!r}, scheduler has no such setting" for k in missing]
        if diffs:
            raise ValueError(
                f"The tau table for num_inference_steps={n} was made for another scheduler than {class_name} with "
                f"this config ({'; '.join(diffs)}). Load it with the scheduler class and config it was calibrated "
                "for, or calibrate a table for this scheduler."
            )
