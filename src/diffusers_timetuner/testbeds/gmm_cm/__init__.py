"""The bundled consistency model of the digits mixture: an MLP distilled from the mixture's exact probability-flow
ODE (`train.py`), sampled by `CMStochasticIterativeScheduler` at 1-2 steps."""
