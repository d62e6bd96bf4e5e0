"""diffusers-timetuner: TimeTuner (Xia et al., CVPR 2024) for Hugging Face Diffusers.

The solver keeps its grid t_i -> t_{i-1}; the network is fed a tuned timestep tau_i at each evaluation.
"""

__version__ = "0.1.0"
