"""Each TimeTuner scheduler's `__init__` takes exactly its diffusers parent's parameters (same names, order, defaults
and kinds) plus the three table keys, so a diffusers upgrade that adds or changes a parent argument fails here
instead of being silently dropped from saved configs. Classes come from the package's exported scheduler list, so a
new scheduler is covered without editing this file."""
import inspect

import pytest

from diffusers_timetuner import schedulers

TABLE_KEYS = ("tuned_timesteps", "tuned_grids", "tuning_info")
CLASSES = [
    getattr(schedulers, name) for name in schedulers.__all__
    if inspect.isclass(getattr(schedulers, name)) and issubclass(getattr(schedulers, name), schedulers.TimeTunerMixin)
    and getattr(schedulers, name) is not schedulers.TimeTunerMixin
]


def _parent(cls):
    """The diffusers scheduler the class extends: the first base after TimeTunerMixin in the MRO."""
    mro = [c for c in cls.__mro__[1:] if c is not schedulers.TimeTunerMixin and "__init__" in vars(c)]
    return mro[0]


def test_every_exported_scheduler_is_checked():
    assert len(CLASSES) >= 5, [c.__name__ for c in CLASSES]  # the five shipped classes at the time of writing


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_init_is_parent_plus_table_keys(cls):
    parent = _parent(cls)
    ours = inspect.signature(cls.__init__).parameters
    theirs = inspect.signature(parent.__init__).parameters
    expected = [(p.name, p.kind, p.default) for p in theirs.values()]
    got = [(p.name, p.kind, p.default) for p in ours.values() if p.name not in TABLE_KEYS]
    assert got == expected, f"{cls.__name__}.__init__ differs from {parent.__name__}.__init__"
    for key in TABLE_KEYS:
        assert key in ours, f"{cls.__name__}.__init__ lacks {key}"
        assert ours[key].default is None, f"{cls.__name__}.__init__: {key} must default to None (untuned)"
    assert [n for n in ours if n in TABLE_KEYS] == list(TABLE_KEYS)
    assert len(ours) == len(theirs) + len(TABLE_KEYS)
