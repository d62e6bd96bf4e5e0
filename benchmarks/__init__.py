"""Benchmarks of diffusers-timetuner: one script per question, a runner, committed results (see README.md)."""
