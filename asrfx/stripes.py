"""Recording channel-attention vectors and measuring the Stripe Observation.

Zhong, Huang et al., "ASR: Attention-alike Structural Re-parameterization", arXiv 2304.06345
(ECCV 2024: "Stripe Observation Guided Inference Cost-free Attention Mechanism"), observe that in
a *trained* network with channel attention (SE and its relatives) the attention vectors of
different inputs are nearly the same: drawn as a heatmap with one row per input and one column
per channel, they form vertical stripes. An attention that barely depends on its input is, in
effect, a learnable constant per channel -- which is what ASR trains (psi) and then folds away.

The paper's statistic for one attention site is the mean over channels of the standard deviation
of the gate value across inputs; small values mean strong stripes. This module records the gate
of every channel-attention site of a model over a data set (:class:`AttentionRecorder`), computes
the statistic (:func:`stripe_statistic`, :func:`stripe_report`) and draws the heatmaps
(:func:`plot_stripes`) and the statistic over training (:func:`plot_stripe_history`).

Sites are found by structure (:func:`asrfx.passes.find_attention_sites`), so any spelling the
compiler recognises can be observed, without hooks and without naming module classes.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn
from tqdm import tqdm

from asrfx.passes import find_attention_sites
from asrfx.passes.graph_utils import module_device

from .errors import InputError
from .tracing import DualModeGraphModule, trace

__all__ = ["AttentionRecorder", "stripe_statistic", "stripe_report", "plot_stripes",
           "plot_stripe_history"]


class _GateCapture(fx.Interpreter):
    """Runs a graph and keeps the values of the gate nodes and the batch size of each site."""

    def __init__(self, gm: fx.GraphModule, graph: fx.Graph, gates: Mapping[fx.Node, int],
                 muls: Mapping[fx.Node, int]):
        super().__init__(gm, graph=graph)
        self.gates = gates  # gate node -> site index
        self.muls = muls    # multiply node -> site index
        self.gate_values: dict[int, Tensor] = {}
        self.batch: dict[int, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        i = self.gates.get(n)
        if i is not None:
            self.gate_values[i] = out.detach()
        i = self.muls.get(n)
        if i is not None and isinstance(out, Tensor) and out.dim() >= 1:
            self.batch[i] = int(out.shape[0])
        return out


def _unique_names(paths: Sequence[str]) -> list[str]:
    """Site paths, with ``#1``, ``#2``, ... appended to every path that occurs more than once."""
    counts = Counter(paths)
    seen: Counter = Counter()
    names = []
    for p in paths:
        if counts[p] > 1:
            seen[p] += 1
            names.append(f"{p}#{seen[p]}")
        else:
            names.append(p)
    return names


def _first_input(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise InputError(
        "each batch must be a tensor or a tuple/list whose first element is the input tensor "
        f"(extra elements such as labels are ignored), got {type(batch).__name__}"
        + (f" starting with {type(batch[0]).__name__}" if isinstance(batch, (tuple, list))
           and batch else ""))


class AttentionRecorder:
    """Records the per-channel attention vector of every channel-attention site of a model.

    The model is traced once with :func:`asrfx.trace`; the traced GraphModule shares the model's
    submodules and parameters, so :meth:`record` always reads the model's *current* weights and
    one recorder can be reused after every training epoch.

    Args:
        model: an ``nn.Module`` with input-dependent channel attention (SE-like: a per-channel
            gate computed from globally pooled statistics that multiplies a feature map).
        example_inputs: a tensor or tuple of tensors the model accepts; used for tracing and
            shape metadata only (the batch size does not need to match the data).
        leaf_modules: module names or types to keep opaque while tracing (see
            :func:`asrfx.trace`).

    Attributes:
        graph_module: the traced model.
        sites: the :class:`~asrfx.passes.find_attention.AttentionSite` s found, in graph order.
        names: one unique name per site: its module path, with ``#1``, ``#2``, ... appended to
            every path shared by several sites.
        channels: site name -> number of channels C.

    Raises:
        InputError: the model has no input-dependent channel attention (for example, it was
            already rewritten by :func:`asrfx.prepare` or :func:`asrfx.fold`), or the example
            inputs do not fit it.
        TraceError: the model cannot be traced.

    Example:
        >>> model = asrfx.zoo.cifar_resnet(20, attention="se", block="basic", num_classes=10)
        >>> rec = AttentionRecorder(model, torch.randn(2, 3, 32, 32))
        >>> vectors = rec.record([torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)])
        >>> vectors["layer1.0.attention"].shape
        torch.Size([16, 16])
    """

    def __init__(self, model: nn.Module, example_inputs: Any, *,
                 leaf_modules: Sequence[str | type] = ()) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"AttentionRecorder expects an nn.Module, got {type(model).__name__}")
        if example_inputs is None:
            raise InputError("AttentionRecorder needs example_inputs=(x,): a batch the model "
                             "accepts (shapes are read from it)")
        self.model = model
        modes = [(m, m.training) for m in model.modules()]
        try:  # tracing restores only the top-level flag; keep a mixed train/eval state intact
            self.graph_module = trace(model, example_inputs, leaf_modules=leaf_modules)
        finally:
            for m, was in modes:
                m.training = was
        gm = self.graph_module
        self._graph = gm.eval_graph if isinstance(gm, DualModeGraphModule) else gm.graph
        sites, refusals = find_attention_sites(_GraphView(gm, self._graph))
        if not sites:
            refused = ""
            if refusals:
                refused = (" (per-channel multiplies that look like attention but were not "
                           "recognised: " + "; ".join(f"'{p}': {r}" for p, r, _ in refusals[:5])
                           + ")")
            raise InputError(
                f"{type(model).__name__} has no input-dependent channel attention to record"
                f"{refused}. A model returned by asrfx.prepare (its attention reads a learnable "
                "constant psi) or asrfx.fold has none by construction: pass the original model "
                "with its attention modules (e.g. SE) instead, trained as usual.")
        self.sites = sites
        self.names = _unique_names([s.path for s in sites])
        self.channels = {name: s.channels for name, s in zip(self.names, sites)}

    def __repr__(self) -> str:
        return (f"AttentionRecorder({type(self.model).__name__}, {len(self.sites)} sites: "
                f"{', '.join(self.names[:4])}{', ...' if len(self.names) > 4 else ''})")

    def record(self, batches: Iterable[Any], *, max_inputs: int | None = None,
               progress: bool | None = None) -> dict[str, Tensor]:
        """Run the model over ``batches`` and collect every site's attention vectors.

        The traced graph runs in eval mode under ``torch.no_grad`` (BatchNorm statistics are not
        touched); the train/eval flag of every module is restored afterwards. Inputs are moved
        to the model's device.

        Args:
            batches: an iterable (a list, a ``DataLoader``) of batches, each a tensor or a
                tuple/list whose first element is the input; labels etc. are ignored.
            max_inputs: stop after this many inputs (the last batch is truncated); None records
                everything.
            progress: show a tqdm progress bar; None (default) shows it only on a terminal.

        Returns:
            site name -> float32 CPU tensor of shape ``(num_inputs, C)``: row ``i`` is the gate
            (attention vector) of the ``i``-th input, in the order the batches were given.

        Raises:
            InputError: a batch is not a tensor/tuple, or no input was given.

        Example:
            >>> vectors = rec.record(loader, max_inputs=1000)
            >>> stripe_report(vectors)[0]["statistic"]
            0.0123...
        """
        if max_inputs is not None and (isinstance(max_inputs, bool) or max_inputs < 1):
            raise InputError(f"max_inputs must be a positive int or None, got {max_inputs!r}")
        gm = self.graph_module
        gates = {s.gate: i for i, s in enumerate(self.sites)}
        muls = {s.mul: i for i, s in enumerate(self.sites)}
        chunks: list[list[Tensor]] = [[] for _ in self.sites]
        modes = [(m, m.training) for m in {id(m): m for m in
                                           [*self.model.modules(), *gm.modules()]}.values()]
        device = module_device(gm)
        total = None
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            pass
        seen = 0
        bar = tqdm(batches, total=total, desc="recording attention", unit="batch",
                   disable=None if progress is None else not progress)
        try:
            gm.eval()
            with torch.no_grad():
                for batch in bar:
                    x = _first_input(batch)
                    if max_inputs is not None:
                        x = x[:max_inputs - seen]
                    x = x.to(device)
                    runner = _GateCapture(gm, self._graph, gates, muls)
                    runner.run(x)
                    n = int(x.shape[0])
                    for i in range(len(self.sites)):
                        chunks[i].append(self._as_rows(i, runner, n))
                    seen += n
                    if max_inputs is not None and seen >= max_inputs:
                        break
        finally:
            bar.close()
            for m, was in modes:
                m.training = was
        if seen == 0:
            raise InputError("record() got no inputs: pass a non-empty iterable of batches")
        return {name: torch.cat(c) for name, c in zip(self.names, chunks)}

    def _as_rows(self, i: int, runner: _GateCapture, n: int) -> Tensor:
        site = self.sites[i]
        g = runner.gate_values.get(i)
        if g is None:
            raise RuntimeError(f"asrfx: the gate of site '{self.names[i]}' was not computed")
        c = site.channels
        batch = runner.batch.get(i, n)
        g = g.reshape(g.shape[0], c) if g.dim() >= 2 else g.reshape(1, c)
        if g.shape[0] != batch:
            g = g.expand(batch, c)
        return g.float().cpu().clone()


class _GraphView:
    """Makes ``find_attention_sites`` look at a given graph of a GraphModule (the eval graph)."""

    def __init__(self, gm: fx.GraphModule, graph: fx.Graph):
        self._gm = gm
        self.graph = graph

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gm, name)


def stripe_statistic(vectors: Tensor) -> float:
    """The paper's stripe statistic: mean over channels of the std across inputs.

    Args:
        vectors: ``(num_inputs, C)`` attention vectors of one site (a row per input).

    Returns:
        ``mean_c std_i vectors[i, c]`` with the population std (``unbiased=False``), computed in
        float64. 0 means every input gets the same attention vector (perfect stripes).

    Raises:
        InputError: ``vectors`` is not a 2-D tensor with at least one row.

    Example:
        >>> stripe_statistic(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
        1.0
    """
    if not isinstance(vectors, Tensor) or vectors.dim() != 2 or vectors.shape[0] == 0 \
            or vectors.shape[1] == 0:
        shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
        raise InputError(f"stripe_statistic expects a (num_inputs, C) tensor with at least one "
                         f"input and one channel, got {shape}")
    v = vectors.detach().to(torch.float64)
    return float(v.std(dim=0, unbiased=False).mean().item())


def stripe_report(vectors: Mapping[str, Tensor]) -> list[dict]:
    """One summary row per site of :meth:`AttentionRecorder.record`'s output.

    Args:
        vectors: site name -> ``(num_inputs, C)`` tensor.

    Returns:
        A list (in the order of ``vectors``) of dicts with keys ``path`` (site name),
        ``channels`` (C), ``inputs`` (num_inputs), ``statistic`` (:func:`stripe_statistic`) and
        ``mean_gate`` (mean gate value over inputs and channels).

    Example:
        >>> for row in stripe_report(rec.record(loader)):
        ...     print(f"{row['path']:30s} {row['statistic']:.4f}")
    """
    rows = []
    for name, v in vectors.items():
        rows.append({
            "path": name,
            "channels": int(v.shape[1]) if v.dim() == 2 else 0,
            "inputs": int(v.shape[0]),
            "statistic": stripe_statistic(v),
            "mean_gate": float(v.detach().to(torch.float64).mean().item()),
        })
    return rows


def _figure(figsize: tuple[float, float]):
    """A matplotlib Figure on the Agg canvas (headless; pyplot's global state is untouched)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError("plotting needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format="png")
    return out


def plot_stripes(vectors: Mapping[str, Tensor], path: str | os.PathLike, max_sites: int = 12,
                 max_inputs: int = 200) -> Path:
    """Draw the attention vectors of each site as an inputs x channels heatmap, into one PNG.

    Stripes (columns of one colour) mean the attention hardly depends on the input. Colours
    share one scale: 0..1 when every value lies in [0, 1] (sigmoid gates), else the overall
    min..max.

    Args:
        vectors: site name -> ``(num_inputs, C)`` tensor (from :meth:`AttentionRecorder.record`).
        path: where to write the PNG (parent folders are created).
        max_sites: draw at most this many sites (the first ones, in order).
        max_inputs: draw at most this many inputs (rows) per site; the statistic in each title
            is computed over all inputs.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        InputError: ``vectors`` is empty, or a limit is not positive.

    Example:
        >>> plot_stripes(rec.record(loader), "stripes.png")
        PosixPath('stripes.png')
    """
    if not vectors:
        raise InputError("plot_stripes got no sites to draw")
    if max_sites < 1 or max_inputs < 1:
        raise InputError(f"max_sites and max_inputs must be positive, got {max_sites}, "
                         f"{max_inputs}")
    items = list(vectors.items())[:max_sites]
    shown = [(name, v.detach().float().cpu()[:max_inputs]) for name, v in items]
    stats = [stripe_statistic(v) for _, v in items]
    lo = min(float(v.min()) for _, v in shown)
    hi = max(float(v.max()) for _, v in shown)
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    elif hi <= lo:
        hi = lo + 1.0
    n = len(shown)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = _figure((3.6 * cols + 0.8, 3.0 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.set_axis_off()
            continue
        name, v = shown[k]
        image = ax.imshow(v.numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                          vmin=lo, vmax=hi)
        ax.set_title(f"{name}\nstripe std {stats[k]:.4f}", fontsize=9)
        ax.set_xlabel("channel", fontsize=8)
        ax.set_ylabel("input", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention value")
    extra = f" (first {max_sites} of {len(vectors)} sites)" if len(vectors) > max_sites else ""
    fig.suptitle("attention vectors: rows = inputs, columns = channels" + extra, fontsize=10)
    return _save(fig, path)


def plot_stripe_history(history: Mapping[str, Sequence[float]] | Sequence[float],
                        path: str | os.PathLike, *, first_epoch: int = 0,
                        title: str | None = None) -> Path:
    """Plot the stripe statistic over training, to see whether stripes form.

    Args:
        history: site name -> statistic per epoch (one line per site, plus their mean in bold
            when there are several sites; the legend lists sites only when there are at most
            10), or one list of values (e.g. the mean over sites).
        path: where to write the PNG (parent folders are created).
        first_epoch: the epoch number of the first value (0 when the untrained model was
            measured first).
        title: figure title (a default one when None).

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        InputError: the history is empty.

    Example:
        >>> history = {}
        >>> for epoch in range(epochs):
        ...     train_one_epoch(model)
        ...     for row in stripe_report(rec.record(val_loader)):
        ...         history.setdefault(row["path"], []).append(row["statistic"])
        >>> plot_stripe_history(history, "stripe_history.png", first_epoch=1)
        PosixPath('stripe_history.png')
    """
    if isinstance(history, Mapping):
        series = {str(k): [float(x) for x in v] for k, v in history.items()}
    elif isinstance(history, Tensor):
        series = {"mean over sites": [float(x) for x in history.flatten().tolist()]}
    else:
        series = {"mean over sites": [float(x) for x in history]}
    series = {k: v for k, v in series.items() if v}
    if not series:
        raise InputError("plot_stripe_history got an empty history")
    from matplotlib.ticker import MaxNLocator

    fig = _figure((7.0, 4.2))
    ax = fig.add_subplot()
    many = len(series) > 10
    for name, values in series.items():
        epochs = range(first_epoch, first_epoch + len(values))
        if len(series) == 1:
            ax.plot(epochs, values, marker="o", lw=2, label=name)
        else:
            ax.plot(epochs, values, lw=1, alpha=0.5 if many else 0.8,
                    label=None if many else name)
    if len(series) > 1:
        length = max(len(v) for v in series.values())
        mean = []
        for e in range(length):
            at = [v[e] for v in series.values() if e < len(v)]
            mean.append(sum(at) / len(at))
        ax.plot(range(first_epoch, first_epoch + length), mean, color="black", lw=2.5,
                label=f"mean over {len(series)} sites")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean over channels of std across inputs")
    ax.set_title(title or "stripe statistic during training (lower = stronger stripes)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)
