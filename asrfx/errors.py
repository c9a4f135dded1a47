"""Exceptions raised by asrfx.

Every failure a user can cause is an :class:`ASRError` subclass whose message names the
module involved and says what to do about it; raw torch.fx tracebacks never escape.
"""

from __future__ import annotations

__all__ = ["ASRError", "TraceError", "FoldMismatch", "InputError"]


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
