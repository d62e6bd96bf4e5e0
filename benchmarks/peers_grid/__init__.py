"""Grid-learning peers, written for the side-by-side benchmark (``benchmarks/grid_side_by_side.py``).

Each peer returns, for one (model, scheduler, NFE), an integer grid t_K > ... > t_1 (and LD3 also a decoupled
model-input time, which is exactly a TimeTuner tau table), so that every method samples through the package's own
TimeTuner schedulers:

- ``continuous``: a differentiable DDIM / DPM-Solver++(2M) in continuous diffusers time (alpha-bar interpolated at
  fractional timesteps), the same arithmetic as the package schedulers on an integer grid;
- ``gits``: GITS (Chen et al., ICML 2024), dynamic programming over a fine teacher trajectory;
- ``ld3``: LD3 (Tong et al., ICLR 2025), learned timesteps plus decoupled model time, trained through the sampler.
- ``dmn``: DMN (Xue et al., CVPR 2024), data-free: a small constrained optimisation of the log-SNR steps against a
  model of the solver's error (no model evaluation).
"""
