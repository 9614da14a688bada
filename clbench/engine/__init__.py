"""The engine: the experience loop, resume state, loaders, sweeps, progress and loggers."""
