"""`python -m diffusers_timetuner.hub [--write-index]`: print or rewrite the bundled tuned_schedules/ index."""
from __future__ import annotations

from .bundled import render_bundled_index, write_bundled_index


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Maintain the bundled tuned_schedules/ index.")
    parser.add_argument("--write-index", action="store_true", help="rewrite tuned_schedules/README.md")
    args = parser.parse_args(argv)
    if args.write_index:
        print(write_bundled_index())
    else:
        print(render_bundled_index(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
