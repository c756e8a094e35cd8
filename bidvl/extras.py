"""Optional dependencies: the one place that knows which extra of the package brings which module.

    timm = require("timm", ConfigError)   # the module, or ConfigError("... pip install 'bidvl[timm]'")

The core (training, sampling, RMSE and OOD evaluation, the digits and FashionMNIST writers, FID-style
figures with the shipped classifier) needs none of them; `pip install 'bidvl[all]'` brings them all.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (extra, pip package, what needs it)
EXTRAS = {
    "timm": ("timm", "timm", "model.arch=timm and timm feature extractors"),
    "torch_fidelity": ("fid", "torch-fidelity", "FID with the TF-compatible Inception-v3"),
    "scipy": ("svhn", "scipy", "reading SVHN's .mat files"),
    "matplotlib": ("study", "matplotlib", "the plots of study reports"),
}


def require(module: str, error: type[Exception] = ImportError) -> ModuleType:
    """Imports `module` (a key of EXTRAS, or one of its submodules); when it is not installed,
    raises `error` (the caller's error class, so that its command line reports it in one line)
    naming what needs it and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra, package, what = EXTRAS[module.split(".")[0]]
        raise error(f"{what} needs the package {package}, which is not installed: "
                    f"pip install 'bidvl[{extra}]' (or pip install {package})") from None
