"""The installed distribution's version (from its metadata, so pyproject.toml is the one place it is written)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffusers-timetuner")
except PackageNotFoundError as err:  # a source tree on PYTHONPATH without `pip install -e .`
    raise ImportError(
        "diffusers-timetuner is not installed, so its version is unknown: run `pip install -e .` in the source tree."
    ) from err
