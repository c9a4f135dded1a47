"""asrfx: attention-alike structural re-parameterization (ASR) on torch.fx.

Train with channel attention, deploy without it: :func:`prepare` rewrites every channel
attention of a model into its ASR training form (the attention reads a learnable constant psi
instead of the feature map); :func:`fold` evaluates those branches after training and folds their
constant output into neighbouring BatchNorm / Conv / Linear layers, checked exact.

Method: Zhong, Huang et al., "ASR: Attention-alike Structural Re-parameterization",
arXiv 2304.06345 (ECCV 2024: "Stripe Observation Guided Inference Cost-free Attention Mechanism").
"""

import importlib
import importlib.util
from typing import Any

from .errors import ASRError, ExportError, FoldMismatch, InputError, NonFiniteError, TraceError

__version__ = "0.1.0"

__all__ = ["prepare", "fold", "trace", "relative_error", "ASRError", "TraceError",
           "FoldMismatch", "InputError", "NonFiniteError", "ExportError", "Report", "Site",
           "DualModeGraphModule", "zoo", "attention", "foldmath", "runtimes", "__version__"]

# torch and the passes load on first use, so that ``asrfx --help`` (and any tool importing the
# package for its metadata) starts at once: name -> the submodule defining it
_LAZY = {"prepare": "api", "fold": "api", "relative_error": "api", "Report": "report",
         "Site": "report", "DualModeGraphModule": "tracing", "trace": "tracing"}
_SUBMODULES = ("attention", "foldmath", "runtimes", "zoo")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES or (not name.startswith("__") and
                                 importlib.util.find_spec(f"{__name__}.{name}") is not None):
        value = importlib.import_module(f".{name}", __name__)  # asrfx.tracing, asrfx.passes...
    else:
        raise AttributeError(f"module 'asrfx' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
