"""Calibrate tau tables: `accelerate launch examples/calibrate.py --help` (no arguments: bundled MNIST, DDIM 10)."""
from diffusers_timetuner.cli.calibrate import main, parse_args

if __name__ == "__main__":
    main(parse_args())
