"""Command-line entry points (``timetuner-calibrate``)."""
