"""herd's engine: what a training run is (config, model, data, train module, trainer, callbacks)."""

__version__ = "0.1.0"
