"""BiDVL: bi-level training of energy-based latent variable models (see README.md).

    import bidvl
    m = bidvl.load("runs/digits/model")   # a run folder or its exported model/ folder
    x = m.sample(16)                      # see bidvl.api

`import bidvl` stays cheap: torch and the nets are imported on the first `load`.
"""

__all__ = ["BiDVLModel", "load", "__version__"]
__version__ = "0.1.0"  # the package's version (pyproject.toml reads it from here)


def load(path, device="cpu", ema=None, checkpoint=None):
    """A trained model (`bidvl.api.BiDVLModel`) from a run folder or an exported RUN_DIR/model
    folder; ema=None uses the generator EMA when there is one (see `bidvl.api.load`)."""
    from .api import load as load_model

    return load_model(path, device=device, ema=ema, checkpoint=checkpoint)


def __getattr__(name):
    if name == "BiDVLModel":
        from .api import BiDVLModel

        return BiDVLModel
    raise AttributeError(f"module 'bidvl' has no attribute {name!r}")
