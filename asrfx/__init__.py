"""asrfx: attention-alike structural re-parameterization (ASR) on torch.fx.

Train with channel attention, deploy without it: :func:`prepare` rewrites every channel
attention of a model into its ASR training form (the attention reads a learnable constant psi
instead of the feature map); :func:`fold` evaluates those branches after training and folds their
constant output into neighbouring BatchNorm / Conv / Linear layers, checked exact.

Method: Zhong, Huang et al., "ASR: Attention-alike Structural Re-parameterization",
arXiv 2304.06345 (ECCV 2024: "Stripe Observation Guided Inference Cost-free Attention Mechanism").
"""

from . import attention, foldmath, runtimes, zoo
from .api import fold, prepare, relative_error
from .errors import ASRError, ExportError, FoldMismatch, InputError, NonFiniteError, TraceError
from .report import Report, Site
from .tracing import DualModeGraphModule, trace

__version__ = "0.1.0"

__all__ = ["prepare", "fold", "trace", "relative_error", "ASRError", "TraceError",
           "FoldMismatch", "InputError", "NonFiniteError", "ExportError", "Report", "Site", "DualModeGraphModule", "zoo", "attention",
           "foldmath", "runtimes", "__version__"]
