"""Exceptions raised by asrfx.

Every failure a user can cause is an :class:`ASRError` subclass whose message names the
module involved and says what to do about it; raw torch.fx tracebacks never escape.
"""

from __future__ import annotations

__all__ = ["ASRError", "TraceError", "FoldMismatch", "InputError", "NonFiniteError",
           "ExportError"]


class ASRError(RuntimeError):
    """Base class of every asrfx error."""


class TraceError(ASRError):
    """The model could not be captured as a torch.fx graph.

    Attributes:
        module_path: qualified name of the module that failed ("" is the top level).
        reason: the underlying tracer message.
    """

    def __init__(self, module_path: str, reason: str, fix: str):
        self.module_path = module_path
        self.reason = reason
        where = f"module '{module_path}'" if module_path else "the top-level module"
        super().__init__(f"asrfx could not trace {where}: {reason}\n  fix: {fix}")


class InputError(ASRError, ValueError):
    """A bad argument: wrong example inputs, unknown option, wrong model state."""


class NonFiniteError(ASRError, ValueError):
    """The model given to ``fold`` outputs NaN or Inf in eval mode, so no fold can be checked.

    The message names where the non-finite values first appear: the example input, a parameter
    or buffer (e.g. a BatchNorm's ``running_var``), or the first layer whose output is
    non-finite.
    """


class FoldMismatch(ASRError):
    """The folded model's outputs differ from the model it was folded from.

    Attributes:
        rel_error: the measured relative error (max |a-b| / max |a|).
        site: the site whose fold alone causes the largest error (None if unknown).
    """

    def __init__(self, rel_error: float, tol: float, site: str | None, detail: str = ""):
        self.rel_error = rel_error
        self.site = site
        where = f"; worst site: {site}" if site else ""
        super().__init__(
            f"folded model differs from the original: relative error {rel_error:.3e} > {tol:.1e}{where}. "
            f"{detail}Fold with check=False to inspect the result, and please report the model."
        )


class ExportError(ASRError):
    """A model could not be exported to or run in a deployment runtime, or its outputs there differ.

    Raised by :mod:`asrfx.runtimes` (ONNX / onnxruntime, torch.export) when the exporter rejects
    the model, a runtime package is missing, or a checked export disagrees with the eager model.

    Attributes:
        model: the model's name (its class, or a file name).
        runtime: the runtime involved ("onnx", "onnxruntime", "torch.export", ...).
        reason: the underlying error, first line (or the measured difference).
        rel_error: the measured relative error (max |a-b| / max |a|) when outputs differ, else None.
    """

    def __init__(self, model: str, runtime: str, reason: str, fix: str,
                 rel_error: float | None = None):
        self.model = model
        self.runtime = runtime
        self.reason = reason
        self.rel_error = rel_error
        super().__init__(f"asrfx could not deploy {model} to {runtime}: {reason}\n  fix: {fix}")
