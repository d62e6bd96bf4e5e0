"""Behaviour shared by every TimeTuner scheduler.

TimeTuner keeps a solver and its grid t_K > ... > t_1 and feeds the network a tuned timestep tau_i at evaluation i.
The rule every method here follows: **the solver update depends only on the step index i (the grid), never on tau;
tau only decides what the network sees.** So after ``set_timesteps(n)``:

- ``scheduler.grid_timesteps`` is the parent scheduler's grid (what the solver integrates on), always;
- ``scheduler.timesteps`` is the tau table for n (float32) when the config has one, else the parent's timesteps;
- every method that receives a timestep from the pipeline (``step``, ``add_noise``, ``scale_model_input``,
  ``get_velocity``, ``index_for_timestep``) maps it back to i with a tolerant lookup and works on the grid.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, NoReturn, Sequence

import numpy as np
import torch

from ..table import (
    MADE_FOR_KEY,
    TAU_ATOL,
    TAU_RTOL,
    TauTable,
    check_made_for,
    matching_indices,
    normalize_step_key,
    normalize_tuning_config,
    scheduler_fingerprint,
    timesteps_close,
)

__all__ = ["TimeTunerMixin", "quadratic_timesteps", "validate_custom_timesteps"]

CALIBRATE_HINT = "accelerate launch examples/calibrate.py --num_inference_steps {n} ..."


def quadratic_timesteps(num_inference_steps: int, num_train_timesteps: int) -> np.ndarray:
    """The "quad" trajectory of the DDIM paper's reference code, used by TimeTuner on CIFAR10 / CelebA.

    Source: ermongroup/ddim, ``runners/diffusion.py`` (``skip_type == "quad"``)::

        seq = np.linspace(0, np.sqrt(num_timesteps * 0.8), timesteps) ** 2
        seq = [int(s) for s in list(seq)]

    sampled from ``seq[-1]`` down to ``seq[0] = 0``, the model called at each ``seq`` value (their ``t`` indexes the
    same ``alphas_cumprod`` as diffusers, see ``compute_alpha``: ``index_select(0, t + 1)`` on a cumprod with a
    leading 1). The TimeTuner paper (Sec. 5) only names the "quadratic trajectory"; its code release has no grid code.
    ``steps_offset`` is not applied (the reference has none).

    Returns:
        `np.ndarray` of int64, descending.

    Raises:
        ValueError: if the truncation to integers makes two timesteps equal (about n > 29 for T = 1000).
    """
    seq = np.linspace(0, np.sqrt(num_train_timesteps * 0.8), num_inference_steps) ** 2
    grid = np.array([int(s) for s in seq], dtype=np.int64)[::-1].copy()
    if len(np.unique(grid)) != len(grid):
        raise ValueError(
            f"timestep_spacing='quadratic' with num_inference_steps={num_inference_steps} and num_train_timesteps="
            f"{num_train_timesteps} gives duplicate integer timesteps {grid.tolist()}; use fewer steps or another "
            "spacing."
        )
    return grid


def validate_custom_timesteps(timesteps: Sequence[Any], num_train_timesteps: int) -> np.ndarray:
    """Check a user grid: non-empty, integers, strictly descending, within [0, num_train_timesteps - 1]."""
    if hasattr(timesteps, "tolist"):
        timesteps = timesteps.tolist()
    values = list(timesteps)
    if len(values) == 0:
        raise ValueError("`timesteps` is empty: pass the grid t_K > ... > t_1 as a descending list of integers.")
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or float(v) != int(v):
            raise ValueError(
                f"`timesteps[{j}]` = {v!r} is not an integer: a custom grid holds integer training timesteps "
                "(the tuned, fractional timesteps go in the `tuned_timesteps` table instead)."
            )
    grid = np.array([int(v) for v in values], dtype=np.int64)
    if np.any(np.diff(grid) >= 0):
        raise ValueError(f"`timesteps` must be strictly descending (t_K > ... > t_1), got {grid.tolist()}.")
    if grid[-1] < 0 or grid[0] > num_train_timesteps - 1:
        raise ValueError(
            f"`timesteps` must lie in [0, {num_train_timesteps - 1}] (num_train_timesteps - 1), got {grid.tolist()}."
        )
    return grid


def _scalar(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"Expected one timestep, got a tensor of shape {tuple(timestep.shape)}.")
        return float(timestep.item())
    if isinstance(timestep, np.ndarray) and timestep.size == 1:
        return float(timestep.item())
    if isinstance(timestep, numbers.Real) and not isinstance(timestep, bool):
        return float(timestep)
    raise ValueError(f"Expected a timestep (number or one-element tensor), got {type(timestep).__name__}.")


def _is_integer_timestep(timestep: Any) -> bool:
    """Integer-dtype timesteps are grid / training timesteps; floating ones are what the network saw (tau)."""
    if isinstance(timestep, torch.Tensor):
        return not (timestep.is_floating_point() or timestep.is_complex())
    if isinstance(timestep, np.ndarray):
        return np.issubdtype(timestep.dtype, np.integer)
    return isinstance(timestep, numbers.Integral) and not isinstance(timestep, bool)


def _raise_no_single_match(values: np.ndarray, t: float, hits: Sequence[int], what: str) -> NoReturn:
    shown = [round(v, 4) for v in values.tolist()]
    if len(hits) == 0:
        raise ValueError(
            f"Timestep {t!r} is not one of {what} {shown}. Pass the timesteps the scheduler gives you "
            "(`scheduler.timesteps`, which hold the tuned tau values when a table is active), unchanged."
        )
    raise ValueError(
        f"Timestep {t!r} matches several entries {list(hits)} of {what} {shown}; the step is ambiguous."
    )


def find_timestep_index(schedule: torch.Tensor, timestep: Any, *, what: str = "scheduler.timesteps") -> int:
    """Index of `timestep` in `schedule`, matched within the table tolerance (never exact float equality).

    Raises:
        ValueError: when no entry or more than one entry matches.
    """
    t = _scalar(timestep)
    values = schedule.detach().to("cpu", torch.float64).reshape(-1).numpy()
    hits = matching_indices(values, t).tolist()
    if len(hits) == 1:
        return hits[0]
    _raise_no_single_match(values, t, hits, what)


def _version_of(tensor: torch.Tensor) -> int | None:
    """The in-place modification counter of `tensor`; `None` for inference-mode tensors, which have none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _isolated_entries(values: list[float]) -> dict[float, int]:
    """{value: index} of the entries no other entry lies within the look-up tolerance of (see `_TimestepLookup`)."""
    exact: dict[float, int] = {}
    if values and all(map(math.isfinite, values)):
        # Every pairwise tolerance is <= atol + rtol * max|v| < reach, so an entry whose neighbours in sorted order
        # are both farther than reach can only ever match a timestep equal to itself on its own.
        reach = 2.0 * (TAU_ATOL + TAU_RTOL * max(map(abs, values)))
        order = sorted(range(len(values)), key=values.__getitem__)
        ordered = [values[j] for j in order] + [math.inf]
        below = -math.inf
        for k, j in enumerate(order):
            if ordered[k] - below > reach and ordered[k + 1] - ordered[k] > reach:
                exact[ordered[k]] = j
            below = ordered[k]
    return exact


class _TimestepLookup:
    """`find_timestep_index` for one schedule tensor, prepared once so that a step costs no tensor operation.

    The schedule is copied to CPU float64 once (or taken from `prepared`, the same analysis made once per tau
    table). Entries that no other entry lies within the tolerance of go into a dict, so the usual call (the pipeline
    passes back an exact element of the schedule) is one dict look-up; any other value is scanned with the same rule
    as `find_timestep_index`, so both give the same index or error. A pipeline iterating `scheduler.timesteps` passes
    views of the schedule itself: their index is their place in its storage, found without reading the value (no
    device synchronisation on an accelerator), and accepted only for an entry the dict holds, so the answer is the
    one the value look-up gives. `is_current` tells whether the tensor is still the one (same object, storage and
    contents) it was built from.
    """

    def __init__(self, schedule: torch.Tensor, prepared: tuple[np.ndarray, dict[float, int]] | None = None):
        self.source = schedule
        self.data_ptr = schedule.data_ptr()
        self.version = _version_of(schedule)
        # inference tensors have no version counter: compare contents instead
        self.snapshot = schedule.detach().clone() if self.version is None else None
        if prepared is None:
            # a copy: a float64 CPU schedule would otherwise share its memory with these values
            self.values = schedule.detach().to("cpu", torch.float64).reshape(-1).numpy().copy()
            self.exact = _isolated_entries(self.values.tolist())
        else:
            self.values, self.exact = prepared
        self.floats: list[float] = self.values.tolist()
        # where the entries live, for views of the schedule (a 1-D tensor with a version counter only); the lookup
        # keeps `source` alive, so another tensor at one of these addresses on its device shares its memory
        self.isolated = frozenset(self.exact.values())
        self.viewable = schedule.ndim == 1 and self.version is not None and schedule.stride(0) > 0
        self.dtype, self.device = schedule.dtype, schedule.device
        self.entry_bytes = schedule.stride(0) * schedule.element_size() if schedule.ndim == 1 else 0

    def view_index(self, timestep: Any) -> int | None:
        """The index of `timestep` when it is a one-element view of an isolated entry of the schedule, else `None`."""
        if not self.viewable or not isinstance(timestep, torch.Tensor) or timestep.dtype != self.dtype:
            return None
        i, rest = divmod(timestep.data_ptr() - self.data_ptr, self.entry_bytes)
        if rest or i not in self.isolated or timestep.numel() != 1 or timestep.device != self.device:
            return None
        return i

    def is_current(self, schedule: torch.Tensor) -> bool:
        if schedule is not self.source or schedule.data_ptr() != self.data_ptr:
            return False
        if self.version is not None:
            return _version_of(schedule) == self.version
        return self.snapshot.shape == schedule.shape and torch.equal(self.snapshot, schedule.detach())

    def index(self, timestep: Any, what: str) -> int:
        i = self.view_index(timestep)
        if i is not None:
            return i
        t = _scalar(timestep)
        i = self.exact.get(t)
        if i is not None:
            return i
        hits = matching_indices(self.values, t).tolist()
        if len(hits) == 1:
            return hits[0]
        _raise_no_single_match(self.values, t, hits, what)


class TimeTunerMixin:
    """Tau-table handling shared by the TimeTuner schedulers.

    A subclass ``TimeTunerXScheduler(TimeTunerMixin, XScheduler)`` declares the parent's full ``__init__`` signature
    plus ``tuned_timesteps``, ``tuned_grids`` and ``tuning_info`` under ``@register_to_config``, calls the parent's
    ``__init__`` and then ``self._init_tau_tables(...)``; its ``set_timesteps`` calls
    ``self._check_table_available(n)``, then, inside ``with self._restore_on_error():``, the parent's
    ``set_timesteps`` and ``self._apply_tau_table()``.

    With ``tuned_timesteps`` `None` or empty, every method behaves exactly as the parent's.
    """

    def _init_tau_tables(self, tuned_timesteps, tuned_grids, tuning_info) -> None:
        tables, taus, grids, info = normalize_tuning_config(
            tuned_timesteps, tuned_grids, tuning_info, num_train_timesteps=self._table_timestep_bound(),
            num_evaluations=self._num_evaluations,
        )
        # a table that records the scheduler it was made for is refused by any other (class, betas, prediction type,
        # grid settings); this runs on every load path (from_pretrained, from_config, the constructor)
        check_made_for(tables, type(self).__name__, self.config)
        # The config stores the normalised JSON form (string keys, float lists), so that it equals what
        # save_pretrained -> from_pretrained gives back.
        self.register_to_config(tuned_timesteps=taus, tuned_grids=grids, tuning_info=info)
        self._tau_tables: dict[int, TauTable] = tables
        self._active_table: TauTable | None = None
        self.grid_timesteps = self.timesteps.clone()
        self._timestep_lookups: dict[int, _TimestepLookup] = {}  # id(schedule tensor) -> prepared lookup
        self._tau_preparations: dict[tuple, tuple] = {}  # (n, dtype) -> (table, CPU taus, look-up analysis)

    def _table_timestep_bound(self) -> int:
        """Taus above ``bound - 1`` get a `TunedTimestepsWarning` (outside the training range)."""
        return self.config.num_train_timesteps

    def _num_evaluations(self, num_inference_steps: int) -> int:
        """Model evaluations (taus of a table, entries of `timesteps`) for n steps: n here, 2n - 1 for Heun."""
        return num_inference_steps

    def _steps_for_evaluations(self, num_evaluations: int) -> int:
        """Inverse of `_num_evaluations`: the step count n whose table applies to `len(timesteps)` evaluations."""
        return num_evaluations

    def _tau_dtype(self, grid: torch.Tensor) -> torch.dtype:
        """dtype of the tau tensor put in `timesteps` (float32; a class may keep its grid's floating dtype)."""
        return torch.float32

    # ---- read-only views -------------------------------------------------------------------------------------
    @property
    def tau_tables(self) -> dict[int, TauTable]:
        """The validated tables, by step count."""
        return dict(self._tau_tables)

    @property
    def tuned_step_counts(self) -> list[int]:
        """Step counts n for which the config has a tau table."""
        return sorted(self._tau_tables)

    @property
    def active_table(self) -> TauTable | None:
        """The table applied by the last `set_timesteps`, or `None` when the scheduler runs untuned."""
        return self._active_table

    @property
    def is_tuned(self) -> bool:
        """Whether `scheduler.timesteps` currently holds tau values (a table was applied)."""
        return self._active_table is not None

    # ---- set_timesteps helpers -------------------------------------------------------------------------------
    @staticmethod
    def _count_evaluations(num_inference_steps=None, timesteps=None, sigmas=None) -> int | None:
        """Number of model evaluations set_timesteps will produce (n for every scheduler here).

        Raises:
            ValueError: if `num_inference_steps` (used when neither `timesteps` nor `sigmas` is given) is not a
                positive integer.
        """
        if timesteps is None and sigmas is None and num_inference_steps is not None:
            if (
                isinstance(num_inference_steps, bool)
                or not isinstance(num_inference_steps, numbers.Integral)
                or int(num_inference_steps) < 1
            ):
                raise ValueError(
                    f"`num_inference_steps` must be a positive integer (the number of model evaluations), got "
                    f"{num_inference_steps!r}."
                )
            num_inference_steps = int(num_inference_steps)
        if timesteps is not None:
            return len(timesteps)
        if sigmas is not None:
            return len(sigmas) - 1
        return num_inference_steps

    def _learned_grid(self, num_inference_steps=None, timesteps=None, sigmas=None) -> list[int] | None:
        """The learned grid plain `set_timesteps(n)` samples on: the table for n records one (``tuning_info[n]
        ["learned_grid"]``) and no explicit `timesteps` / `sigmas` were given; else `None`."""
        if num_inference_steps is None or timesteps is not None or sigmas is not None:
            return None
        table = self._tau_tables.get(self._steps_for_evaluations(int(num_inference_steps)))
        return None if table is None else table.learned_grid

    def _set_learned_grid(self, set_parent, learned: list[int] | None, device) -> None:
        """After the parent's `set_timesteps(n)`: move to the learned grid when it differs from the parent's own
        (a learned grid equal to the default keeps the parent's arithmetic bit for bit)."""
        if learned is None:
            return
        produced = self.timesteps.detach().cpu().tolist()
        if len(produced) == len(learned) and all(timesteps_close(a, b) for a, b in zip(produced, learned)):
            return
        set_parent(learned, device)

    def _check_table_available(self, n: int | None) -> None:
        """Raise before touching any state when tables exist but none is for n."""
        if n is None or not self._tau_tables or n in self._tau_tables:
            return
        raise ValueError(
            f"{type(self).__name__} has tau tables for num_inference_steps {self.tuned_step_counts}, not for {n}. "
            f"Use one of those step counts, calibrate a table for {n} steps "
            f"(`{CALIBRATE_HINT.format(n=n)}`), or load the scheduler without `tuned_timesteps` to sample untuned."
        )

    @contextlib.contextmanager
    def _restore_on_error(self):
        """Leave the scheduler as it was if setting the grid or applying the table fails (no half-set state).

        The parents' ``set_timesteps`` rebind attributes (and ``_internal_dict`` via ``register_to_config``) rather
        than mutate them in place, so a shallow copy of ``__dict__`` is enough to restore them.
        """
        saved = dict(self.__dict__)
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    def _apply_tau_table(self) -> None:
        """After the parent's set_timesteps: keep its grid, then expose the taus for that step count (if any)."""
        grid = self.timesteps
        self.grid_timesteps = grid.clone()
        self._active_table = None
        if not self._tau_tables:
            return  # untuned: exactly the parent
        n = self._steps_for_evaluations(len(grid))
        self._check_table_available(n)
        table = self._tau_tables[n]
        if table.grid is not None:
            produced = grid.detach().cpu().tolist()
            if produced != list(table.grid) and (len(produced) != len(table.grid) or not all(
                timesteps_close(a, b) for a, b in zip(produced, table.grid)
            )):
                settings = {
                    k: self.config[k]
                    for k in ("timestep_spacing", "steps_offset", "beta_schedule", "num_train_timesteps")
                    if k in self.config
                }
                raise ValueError(
                    f"The tau table for num_inference_steps={n} was tuned on the grid {list(table.grid)}, but this "
                    f"scheduler config ({settings}) produces the grid {produced}. Use the scheduler config the table "
                    f"was tuned with, or calibrate a table for this grid (`{CALIBRATE_HINT.format(n=n)}`)."
                )
        taus_cpu, prepared = self._prepared_table(table, self._tau_dtype(grid))
        self.timesteps = taus_cpu.to(grid.device, copy=True)
        self._active_table = table
        # the step look-up of these taus, analysed once per table: a step then costs a dict look-up at most
        self._remember_lookup(_TimestepLookup(self.timesteps, prepared))

    def _prepared_table(self, table: TauTable, dtype: torch.dtype):
        """The taus of `table` as a CPU tensor of `dtype` and their look-up analysis, computed once per table."""
        key = (table.n, dtype)
        cached = self._tau_preparations.get(key)
        if cached is None or cached[0] is not table:
            taus = torch.tensor(table.taus, dtype=dtype)
            values = taus.to(torch.float64).numpy().copy()
            cached = self._tau_preparations[key] = (table, taus, (values, _isolated_entries(values.tolist())))
        return cached[1], cached[2]

    # ---- step-index lookup -----------------------------------------------------------------------------------
    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Step index i of `timestep`.

        Untuned: the parent's lookup where it has one (bit-for-bit parent behaviour), else a tolerant lookup in
        `scheduler.timesteps`. Tuned: a floating timestep is a tau, found in `schedule_timesteps` (default
        `scheduler.timesteps`) within the table tolerance; an integer one keeps the parent's meaning (a grid
        timestep) and is found in `grid_timesteps`. No match or an ambiguous match raises `ValueError`.
        """
        parent = getattr(super(), "index_for_timestep", None)
        if not self.is_tuned:
            if parent is not None:
                return parent(timestep, schedule_timesteps)
            schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
            return self._find_index(schedule, timestep, "scheduler.timesteps")
        if _is_integer_timestep(timestep):
            return self._find_index(self.grid_timesteps, timestep, "scheduler.grid_timesteps")
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        return self._find_index(schedule, timestep, "scheduler.timesteps (tuned taus)")

    def _find_index(self, schedule: torch.Tensor, timestep: Any, what: str) -> int:
        """`find_timestep_index(schedule, timestep, what=what)`, with the schedule prepared once per tensor."""
        if not isinstance(schedule, torch.Tensor) or schedule.ndim != 1:
            return find_timestep_index(schedule, timestep, what=what)
        return self._prepared(schedule).index(timestep, what)

    def _prepared(self, schedule: torch.Tensor) -> _TimestepLookup:
        """The prepared lookup of a 1-D schedule tensor (also its values as Python floats, `.floats`).

        Keyed by the tensor object and rebuilt whenever that object's storage or contents changed, so `set_timesteps`
        (new tensors), assigning `scheduler.timesteps` and in-place edits all take effect.
        """
        lookup = self._timestep_lookups.get(id(schedule))
        if lookup is None or not lookup.is_current(schedule):
            lookup = self._remember_lookup(_TimestepLookup(schedule))
        return lookup

    def _remember_lookup(self, lookup: _TimestepLookup) -> _TimestepLookup:
        cache = self._timestep_lookups
        if len(cache) >= 8:  # callers passing fresh schedule tensors every time: keep the cache small
            cache.clear()
        cache[id(lookup.source)] = lookup
        return lookup

    def _grid_timesteps_for(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Map tau values (floating tensor) to the grid timesteps t_i of their steps; anything else is unchanged.

        Used where the parent indexes `alphas_cumprod` with the timestep (DDIM, DDPM): the state x_{t_i} lives at
        grid time t_i, tau only feeds the network. Integer timesteps keep the parent's (training-time) meaning.
        """
        if not self.is_tuned or not isinstance(timesteps, torch.Tensor) or not timesteps.is_floating_point():
            return timesteps
        flat = timesteps.reshape(-1)
        idx = [self.index_for_timestep(t) for t in flat]
        grid = self.grid_timesteps.to("cpu")[idx].to(timesteps.device)
        return grid.reshape(timesteps.shape)

    def _check_step_timestep(self, timestep) -> None:
        """Counter-based solvers (DPM-Solver, Euler) ignore `timestep` after the first step; with a table, check
        that the tau passed in belongs to the step the counter is at, so a wrong value cannot pass silently."""
        if self._active_table is None:
            return
        expected = self.step_index if self.step_index is not None else self.begin_index
        # a pipeline hands back an element of `scheduler.timesteps`: the look-up prepared by set_timesteps knows it
        lookup = self._timestep_lookups.get(id(self.timesteps))
        i = lookup.view_index(timestep) if lookup is not None and lookup.is_current(self.timesteps) else None
        if i is None:
            i = self.index_for_timestep(timestep)
        if expected is not None and i != expected:
            raise ValueError(
                f"`step` got the timestep {_scalar(timestep)!r} of step {i}, but the scheduler is at step {expected}. "
                "Pass the timesteps of `scheduler.timesteps` in order (call `set_timesteps` again to restart)."
            )

    # ---- new scheduler with another table ------------------------------------------------------------------
    def with_tuned_timesteps(self, num_inference_steps: int, taus, grid=None, info: dict | None = None):
        """Return a new scheduler of the same class and config with the table for `num_inference_steps` replaced.

        Args:
            num_inference_steps (`int`): the step count n of the table.
            taus (sequence of float): tau per model evaluation, in sampling order.
            grid (sequence, *optional*): the grid the table was tuned on (recorded and checked); `None` removes any
                recorded grid for n.
            info (`dict`, *optional*): JSON provenance; `None` removes any recorded info for n.
        """
        key = normalize_step_key(num_inference_steps)
        tables = dict(self.config.get("tuned_timesteps") or {})
        grids = dict(self.config.get("tuned_grids") or {})
        infos = dict(self.config.get("tuning_info") or {})
        tables[key] = list(taus.tolist() if hasattr(taus, "tolist") else taus)
        grids.pop(key, None)
        infos.pop(key, None)
        if grid is not None:
            grids[key] = list(grid.tolist() if hasattr(grid, "tolist") else grid)
        if info is not None:
            infos[key] = dict(info)
            # record what the table was made for, so that every load path can refuse another scheduler
            # Only the class's own settings: `from_config` of another family's config keeps that family's keys as
            # hidden config entries (e.g. DDIM's `rescale_betas_zero_snr` on a Heun scheduler), which a freshly
            # constructed scheduler of this class does not have.
            own = self._get_init_keys(type(self))
            own_config = {k: v for k, v in self.config.items() if k in own}
            infos[key].setdefault(MADE_FOR_KEY, scheduler_fingerprint(type(self).__name__, own_config))
        return type(self).from_config(
            self.config, tuned_timesteps=tables, tuned_grids=grids or None, tuning_info=infos or None
        )
