"""Zoo sweep: asrfx on one small model per timm family with channel attention, and on
torchvision's attention models (``make zoo-sweep``).

Run in the zoo environment (timm and torchvision need the CUDA build of torch; it runs on the
CPU)::

    ../.zoo-venv/bin/python bench/zoo_sweep.py --out bench/results
    ../.zoo-venv/bin/python bench/zoo_sweep.py --families 5            # a quick check
    ../.zoo-venv/bin/python bench/zoo_sweep.py --only seresnet18 mobilenet_v3_small
    ../.zoo-venv/bin/python bench/zoo_sweep.py --only nf_regnet_b0 --merge   # replace a row
    ../.zoo-venv/bin/python bench/zoo_sweep.py --report-only    # rewrite .md / .png from .json

What it does:

1. **Enumerate.** Every name in ``timm.list_models()`` is built on the meta device (no memory,
   no weights) to count its parameters and its channel-attention modules (the classes in
   :data:`ATTENTION_CLASSES`). A *family* is the name without its size / variant suffix
   (:func:`family_of`); each family is represented by its smallest model, and the families whose
   smallest model holds channel attention are swept. A family whose members differ in structure
   -- another timm module builds them, or another set of attention classes -- adds the smallest
   member of each such kind as an *extra* (e.g. ``seresnet33ts``, a byobnet beside the ResNet
   ``seresnet18``; ``mobileone_s4``, the one MobileOne with SE). torchvision's classification
   models with ``SqueezeExcitation`` are added the same way. The enumeration is cached in
   ``zoo-timm-models.json`` beside the results (``--refresh`` redoes it).
2. **Sweep.** Each model runs in its own subprocess (one torch thread, a timeout; a crash or a
   hang is a row of the table, not the end of the sweep): build with random weights and 10
   classes; every norm's statistics and affine weights and every all-zero parameter but biases
   randomised (timm zero-initialises last norms, last excitation layers and NF-Net gains);
   ``asrfx.prepare``; one SGD step in train mode; norms and psi randomised again;
   ``asrfx.fold``; eval outputs of the prepared and the deploy model compared on the example and
   on an input of another batch and spatial size. The deploy graph is then searched for what is
   left: gates (sigmoid-like and softmax nodes whose output scales a larger map), psi, and
   BatchNorms (and those right behind a conv only they read, which BN fusion could have
   removed).
3. **Write** ``zoo-timm.md`` (a row per model, by family, and a summary), ``zoo-timm.json``
   (everything measured; rewritten after every model, so a long run can be followed) and
   ``zoo-timm.png`` (outcomes; skipped when matplotlib is missing), and print the summary.

"Fully OK" means: every attention module converted (``converted >= attention modules``) and
nothing refused, the fold exact (relative error <= 1e-4 on both inputs), no gate and no psi left,
and a finite training loss.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterable

#: Channel-attention classes counted in a model: ``{module: (class name, ...)}``. Each is a gate
#: computed from a pooled statistic of the map it scales (``x * gate(pool(x))``, or a softmax
#: across branches of one): found by reading ``timm.layers.create_attn`` and by searching the
#: timm package for forwards that multiply a map by a sigmoid / softmax of a pooled statistic.
#: A class missing from the installed version is skipped.
ATTENTION_CLASSES: dict[str, tuple[str, ...]] = {
    # SE (timm.layers.SqueezeExcite is an alias of SEModule), effective SE, channels-last SE
    "timm.layers.squeeze_excite": ("SEModule", "EffectiveSEModule", "SqueezeExciteCl"),
    # the SE of EfficientNet / MobileNetV3 / MixNet / GhostNet ... blocks
    "timm.models._efficientnet_blocks": ("SqueezeExcite",),
    # the SE of the legacy SENet port (legacy_seresnet*, senet154)
    "timm.models.senet": ("SEModule",),
    # PP-HGNet's effective SE (one 1x1 conv and a sigmoid)
    "timm.models.hgnet": ("EseModule",),
    # ECA and circular ECA (conv1d across channels)
    "timm.layers.eca": ("EcaModule", "CecaModule"),
    # gather-excite (a global one is channel attention; a spatial extent gates per region)
    "timm.layers.gather_excite": ("GatherExcite",),
    # global context (attention pooling by matmul; scaling and / or additive fusion)
    "timm.layers.global_context": ("GlobalContext",),
    # CBAM is counted by its channel half (the spatial half is attention per position)
    "timm.layers.cbam": ("ChannelAttn", "LightChannelAttn"),
    # selective kernel and split attention: a softmax across branches of one pooled descriptor
    "timm.layers.selective_kernel": ("SelectiveKernel",),
    "timm.layers.split_attn": ("SplitAttn",),
    # torchvision's SE (EfficientNet, MobileNetV3, RegNetY, MaxViT)
    "torchvision.ops.misc": ("SqueezeExcitation",),
    # pytorchcv (bench/zoo_collections.py): its own SE and split attention, DIA's shared LSTM,
    # selective kernels, the channel half of CBAM, BiSeNet's attention refinement, and the
    # attention that is not per channel (BAM, self-calibrated convs, AirNet, residual attention)
    "pytorchcv.models.common.att": ("SEBlock", "SABlock"),
    "pytorchcv.models.diaresnet": ("DIAAttention",),
    "pytorchcv.models.sknet": ("SKConvBlock",),
    "pytorchcv.models.cbamresnet": ("ChannelGate",),
    "pytorchcv.models.bisenet": ("AttentionRefinementBlock",),
    "pytorchcv.models.sinet": ("SEBlock",),
    "pytorchcv.models.dicenet": ("DiceAttBlock",),
    "pytorchcv.models.fishnet": ("PreSEAttBlock",),
    "pytorchcv.models.bamresnet": ("BamBlock",),
    "pytorchcv.models.scnet": ("ScConv",),
    "pytorchcv.models.airnet": ("AirBlock",),
    "pytorchcv.models.resattnet": ("AttBlock",),
    # the other collections of bench/zoo_collections.py: ResNeSt's own split attention, the
    # SENet port, geffnet's SE, and segmentation_models_pytorch's concurrent spatial and
    # channel SE (its spatial half is refused) and MA-Net's multi-scale fusion attention (two
    # SE gates summed; its position attention block, PAB, is self-attention: left out)
    "resnest.torch.splat": ("SplAtConv2d",),
    "pretrainedmodels.models.senet": ("SEModule",),
    "geffnet.efficientnet_builder": ("SqueezeExcite",),
    "segmentation_models_pytorch.base.modules": ("SCSEModule",),
    "segmentation_models_pytorch.decoders.manet.decoder": ("MFABBlock",),
    # vit-pytorch's MaxViT: SE written with einops layers (Reduce ... Rearrange)
    "vit_pytorch.max_vit": ("SqueezeExcitation",),
    "vit_pytorch.max_vit_with_registers": ("SqueezeExcitation",),
}

#: Looked at and left out, with the reason (a gate per position, or attention between
#: positions / channels, is not a constant-able channel gate): timm.layers BottleneckAttn,
#: HaloAttn, LambdaLayer (self-attention); NonLocalAttn, BatNonLocalAttn (per-position
#: attention); CoordAttn, SimpleCoordAttn, EfficientLocalAttn, StripAttn (gates per row and
#: column); cbam.SpatialAttn; davit ChannelAttention (channel self-attention, no pooled gate);
#: the routing of CondConv (a sigmoid that mixes expert kernels, not a gate on a map).
NOT_CHANNEL_ATTENTION = ("BottleneckAttn", "HaloAttn", "LambdaLayer", "NonLocalAttn",
                         "BatNonLocalAttn", "CoordAttn", "SimpleCoordAttn", "EfficientLocalAttn",
                         "StripAttn", "SpatialAttn", "ChannelAttention", "CondConv2d")

#: vit-pytorch's models take their sizes as arguments and have no registry: small configs of
#: the ones with channel attention (window 4: any input side divisible by 32)
VIT_PYTORCH: dict[str, dict] = {
    "max_vit.MaxViT": dict(dim_conv_stem=16, dim=16, dim_head=8, depth=(1, 1), window_size=4,
                           dropout=0.0),
    "max_vit_with_registers.MaxViT": dict(dim_conv_stem=16, dim=16, dim_head=8, depth=(1, 1),
                                          window_size=4, dropout=0.0),
}

TOL = 1e-4
DEFAULT_TIMEOUT = 240.0
CPU_BUILD_MAX_PARAMS = 50_000_000
EXAMPLE_SIZE = 64
RESULTS_MD = "zoo-timm.md"
RESULTS_JSON = "zoo-timm.json"
RESULTS_PNG = "zoo-timm.png"
MODELS_JSON = "zoo-timm-models.json"


# ---------------------------------------------------------------------------------------------
# families


_VERSION_OR_SIZE = re.compile(r"(.*?[a-z])((?:\d+[a-z]{0,2})+)")

#: Size words, dropped from family names (``gcvit_xxtiny``, ``maxvit_tiny_tf_224``,
#: ``mixnet_xl``, ``lcnetv2_small`` are sizes of one family) -- except ``small`` / ``large``
#: right after a MobileNet part, where they name two searched architectures, not two sizes
#: (``mobilenetv3_small_050 -> mobilenetv3_small``).
SIZE_WORDS = frozenset("atto femto pico nano tiny xxtiny xtiny mini micro small medium base "
                       "large xlarge xxlarge huge giant gigantic xs xxs xl xxl".split())


def family_of(name: str) -> str:
    """The family of a model name: the name without its size / variant suffix.

    The name is split at ``_``. Dropped: a part starting with a digit (``050``, ``224``,
    ``32x4d``, ``400mf``); a trailing number with up to two letters after it, cut from a part
    (``seresnet18``, ``ecaresnet26t``, ``vovnet19b``), unless it is a version (``v3`` in
    ``mobilenetv3``, ``v2``), and the whole part when one letter is left (``b0``, ``m1``,
    ``w18``); a one-letter last part (``mixnet_s``, ``tinynet_a``; one before other parts is a
    kind: ``regnet_y_400mf``); the words of :data:`SIZE_WORDS`.

    Returns:
        the family name, e.g. ``seresnet18 -> seresnet``, ``efficientnet_b0 -> efficientnet``,
        ``regnety_002 -> regnety``, ``seresnext26d_32x4d -> seresnext``,
        ``mobilenetv3_small_050 -> mobilenetv3_small``, ``gcvit_xxtiny -> gcvit``.
    """
    parts = name.split("_")
    out: list[str] = []
    for i, part in enumerate(parts):
        if part[:1].isdigit():
            continue
        m = _VERSION_OR_SIZE.fullmatch(part)
        if m and not m.group(1).endswith("v"):
            part = m.group(1)
            if i > 0 and len(part) == 1:
                continue
        if i > 0 and len(part) == 1 and i == len(parts) - 1:
            continue
        if part in SIZE_WORDS and not (part in ("small", "large")
                                       and any(o.startswith("mobilenet") for o in out)):
            continue
        out.append(part)
    return "_".join(out)


def attention_classes() -> dict[type, str]:
    """The importable classes of :data:`ATTENTION_CLASSES`, each with its label
    (``"<module>.<class>"``, the module's last component). Missing modules or classes are
    skipped.

    Returns:
        ``{class: label}``.
    """
    out: dict[type, str] = {}
    for mod_name, names in ATTENTION_CLASSES.items():
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name in names:
            cls = getattr(mod, name, None)
            if isinstance(cls, type):
                out[cls] = f"{mod_name.rsplit('.', 1)[-1].lstrip('_')}.{name}"
    return out


def count_attention(model: Any, classes: dict[type, str]) -> dict[str, int]:
    """Instances of the attention classes in ``model``, by label (a subclass counts under its
    nearest listed base).

    Returns:
        ``{label: count}``, empty when the model holds none.
    """
    counts: collections.Counter = collections.Counter()
    for m in model.modules():
        for cls in type(m).__mro__:
            if cls in classes:
                counts[classes[cls]] += 1
                break
    return dict(sorted(counts.items()))


class _Alarm(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raises :class:`_Alarm` in the block after ``seconds`` (SIGALRM; main thread only)."""
    def handler(signum, frame):  # noqa: ARG001
        raise _Alarm(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def meta_info(source: str, name: str, classes: dict[type, str]) -> dict[str, Any]:
    """Build ``name`` on the meta device (no memory for weights) and describe it.

    A torchvision model whose constructor cannot run on the meta device (RegNet initialises
    with in-place copies) is built on the CPU instead when its weights' metadata gives it
    fewer than :data:`CPU_BUILD_MAX_PARAMS` parameters.

    Returns:
        ``{"params": int, "attention": {label: count}, "module": str, "input_size": [c, h, w]}``
        (``input_size`` from timm's pretrained config, None for torchvision), or
        ``{"error": "<type>: <first line>"}`` (with ``"params"`` where the weights' metadata
        knows them) when the model cannot be built.
    """
    import torch

    try:
        with _time_limit(60), torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _build(source, name, num_classes=None)
    except Exception as e:  # noqa: BLE001
        err = _error_text(e)
        params = _torchvision_params(name) if source == "torchvision" else None
        if params is None or params > CPU_BUILD_MAX_PARAMS:
            return {"error": err} if params is None else {"error": err, "params_meta": params}
        try:
            with _time_limit(120), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = _build(source, name, num_classes=None)
        except Exception as e2:  # noqa: BLE001
            return {"error": _error_text(e2)}
    info: dict[str, Any] = {
        "params": int(sum(p.numel() for p in model.parameters())),
        "attention": count_attention(model, classes),
        "module": _model_module(source, name, model),
        "input_size": None,
    }
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("input_size"):
        info["input_size"] = list(cfg["input_size"])
    return info


def _torchvision_params(name: str) -> int | None:
    """The parameter count in the metadata of a torchvision model's default weights (None when
    there is none)."""
    import torchvision

    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except Exception:  # noqa: BLE001
        return None


def _model_module(source: str, name: str, model: Any) -> str:
    if source == "timm":
        from timm.models import _registry

        mod = getattr(_registry, "_model_to_module", {}).get(name)
        if mod:
            return str(mod).rsplit(".", 1)[-1]
    return type(model).__module__.rsplit(".", 1)[-1]


def _build(source: str, name: str, num_classes: int | None = 10):
    """A fresh model with random weights (``pretrained=False`` / ``weights=None``).

    Returns:
        the ``nn.Module``; ``num_classes=None`` keeps the default head.

    Raises:
        whatever the model's constructor raises.
    """
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    if source == "pytorchcv":
        from pytorchcv.model_provider import get_model

        return get_model(name, pretrained=False, **kwargs)
    if source == "pretrainedmodels":
        import pretrainedmodels

        return pretrainedmodels.__dict__[name](pretrained=None, **kwargs)
    if source == "resnest":
        import resnest.torch

        return getattr(resnest.torch, name)(pretrained=False, **kwargs)
    if source == "geffnet":
        import geffnet

        return geffnet.create_model(name, pretrained=False, **kwargs)
    if source == "vit_pytorch":  # "<module>.<class>", built with the small VIT_PYTORCH config
        module, cls = name.rsplit(".", 1)
        mod = importlib.import_module(f"vit_pytorch.{module}")
        return getattr(mod, cls)(**VIT_PYTORCH[name], num_classes=num_classes or 1000)
    if source == "smp":  # "<architecture>:<encoder>[:<decoder attention>]"
        import segmentation_models_pytorch as smp

        arch, encoder, *att = name.split(":")
        extra = {"decoder_attention_type": att[0]} if att else {}
        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None,
                                  classes=num_classes or 1, **extra)
    import torchvision

    return torchvision.models.get_model(name, weights=None, **kwargs)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def enumerate_models(cache_path: Path, refresh: bool = False, families_wanted: int | None = None,
                     log=print) -> dict[str, Any]:
    """Meta-build the models of timm and torchvision family by family, cached in ``cache_path``.

    Families are visited in name order; each family's members are all built (their parameter
    counts pick the smallest). With ``families_wanted``, the visit stops once that many timm
    families with channel attention are known (a quick check); the cache keeps what was built,
    so a later full run goes on from there. ``refresh`` ignores the cache.

    Returns:
        the cache: ``{"versions": {...}, "complete": bool, "models": {"timm:<name>": info,
        ...}, "families": {"timm:<family>": {"model", "params", "attention", "members"}}}``
        with ``info`` as :func:`meta_info` returns it; ``families`` names each family's
        smallest model (of those built so far).
    """
    import timm
    import torch
    import torchvision

    versions = {"timm": timm.__version__, "torchvision": torchvision.__version__,
                "torch": torch.__version__}
    cache = {} if refresh else _load_json(cache_path)
    if cache.get("versions") != versions:
        cache = {}
    cache["versions"] = versions
    models: dict[str, dict] = cache.setdefault("models", {})
    classes = attention_classes()

    by_family: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for name in timm.list_models():
        by_family[("timm", family_of(name))].append(name)
    for name in torchvision.models.list_models(module=torchvision.models):
        by_family[("torchvision", family_of(name))].append(name)

    found = 0
    built = 0
    t0 = time.perf_counter()
    for (source, family), names in sorted(by_family.items()):
        for name in names:
            key = f"{source}:{name}"
            if key in models:
                continue
            models[key] = meta_info(source, name, classes)
            built += 1
            if built % 50 == 0:
                log(f"  enumerated {built} new models ({time.perf_counter() - t0:.0f} s)")
                _write_json(cache_path, cache)
        if source == "timm" and families_wanted is not None:
            best = _smallest([models[f"timm:{n}"] | {"name": n} for n in names])
            found += bool(best and best["attention"])
            if found >= families_wanted:
                break
    cache["complete"] = families_wanted is None or bool(cache.get("complete"))
    fams = {}
    for (source, family), names in sorted(by_family.items()):
        best = _smallest([models[f"{source}:{n}"] | {"name": n} for n in names
                          if f"{source}:{n}" in models])
        if best is not None:
            fams[f"{source}:{family}"] = {"model": best["name"], "params": best["params"],
                                          "attention": best["attention"],
                                          "members": len(names)}
    cache["families"] = fams
    _write_json(cache_path, cache)
    if built:
        log(f"  enumerated {built} new models in {time.perf_counter() - t0:.0f} s")
    return cache


def _smallest(infos: list[dict]) -> dict | None:
    ok = [i for i in infos if "params" in i and "attention" in i]
    return min(ok, key=lambda i: (i["params"], i["name"])) if ok else None


def select_models(cache: dict) -> list[dict[str, Any]]:
    """The models to sweep, from an enumeration (see :func:`enumerate_models`).

    Per family: the smallest member, kept if it holds channel attention; then, for each other
    kind of member in the family (another timm module, or another set of attention classes)
    that holds channel attention, its smallest member as an extra (also in a family whose
    smallest member has none).

    Returns:
        entries ``{"source", "family", "model", "params", "attention", "module", "input_size",
        "extra"}`` ordered by source (timm first), family, then the family's main model first.
    """
    groups: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for key, info in cache.get("models", {}).items():
        source, name = key.split(":", 1)
        groups[(source, family_of(name))].append(info | {"name": name, "source": source})
    out = []
    for (source, family), infos in sorted(groups.items(), key=lambda kv: (
            kv[0][0] != "timm", kv[0][1])):
        main = _smallest(infos)
        if main is None:
            continue
        kinds: dict[tuple, list[dict]] = collections.defaultdict(list)
        for i in infos:
            if "params" in i and i.get("attention"):
                kinds[(i["module"], tuple(sorted(i["attention"])))].append(i)
        main_kind = (main["module"], tuple(sorted(main["attention"])))
        picks = ([main] if main["attention"] else []) + [
            _smallest(v) for k, v in sorted(kinds.items()) if k != main_kind]
        for pick in picks:
            out.append({"source": source, "family": family, "model": pick["name"],
                        "params": pick["params"], "attention": pick["attention"],
                        "module": pick["module"], "input_size": pick["input_size"],
                        "extra": pick is not main})
    return out


# ---------------------------------------------------------------------------------------------
# one model (runs in a subprocess)


def _error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def randomize_norms(model, seed: int) -> None:
    """Random running statistics and affine weights for every norm of ``model``, in place (as
    the zoo tests do): running mean, bias ~ U(-0.5, 0.5), running var, weight ~ U(0.5, 1.5)."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            # a BatchNorm subclass traced through by prepare leaves a plain module with its
            # tensors: it is recognised by its running statistics
            stats = isinstance(m._buffers.get("running_var"), torch.Tensor) and \
                isinstance(m._buffers.get("running_mean"), torch.Tensor)
            if stats:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if stats or isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm,
                                       nn.LayerNorm)):
                for name in ("weight", "bias"):
                    p = getattr(m, name, None)
                    if isinstance(p, torch.Tensor):
                        p.copy_(torch.rand(p.shape, generator=gen)
                                + (0.5 if name == "weight" else -0.5))


def randomize_zero_weights(model, seed: int) -> int:
    """Give every all-zero parameter of ``model`` but biases random values, in place:
    ``U(0.5, 1.5)`` for a scalar or one value per channel (a zero-initialised last norm, layer
    scale, skip-init gain or NF-Net ``conv.gain`` of shape ``(C, 1, 1, 1)``), ``N(0, 0.02)``
    for a matrix or kernel (a zero-initialised last excitation or head layer). Without this a
    zero-initialised residual branch hides its attention: psi gets no gradient and the fold is
    compared on a branch that adds nothing.

    Returns:
        the number of tensors changed.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.numel() == 0 or bool(p.any()):
                continue
            if p.dim() == 0 or p.numel() == p.shape[0]:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            n += 1
    return n


def randomize_psi(model, seed: int) -> int:
    """Every psi of ``model`` ~ U(0.1, 1), in place (positive: some statistics psi stands for
    are never negative), as the tests' ``randomize_psi`` does.

    Returns:
        the number of psi.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("psi"):
                p.copy_((torch.rand(p.shape, generator=gen) * 0.9 + 0.1).to(p))
                n += 1
    return n


def rel_err(ref, out) -> float:
    """max |ref - out| / max |ref| in float64 (inf for a shape mismatch, nan for non-finite)."""
    ref, out = ref.detach().double(), out.detach().double()
    if ref.shape != out.shape:
        return math.inf
    return (ref - out).abs().max().item() / max(ref.abs().max().item(), 1e-12)


def _first_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, dict):
        return _first_tensor(list(out.values()))
    return None


def _runs(model, x) -> str | None:
    """None when ``model`` (eval, no grad) runs on ``x``; else the error text."""
    import torch

    model.eval()
    try:
        with torch.no_grad():
            model(x)
        return None
    except Exception as e:  # noqa: BLE001
        return _error_text(e)


def pick_inputs(model, input_size) -> tuple[Any, Any, str]:
    """The example input (2 images at 64x64, or at the pretrained config's size when 64 fails)
    and a second input of another batch and spatial size (3 images, 1.5x / 1.25x the example's
    height / width, else 2x, else the example's size when the model takes one size only).

    Returns:
        ``(x, other, note)``; ``note`` says what was changed, empty when nothing was.

    Raises:
        RuntimeError: the model runs at neither size.
    """
    import torch

    notes = []
    h = w = EXAMPLE_SIZE
    x = torch.randn(2, 3, h, w)
    err = _runs(model, x)
    if err is not None:
        size = list(input_size or (3, 224, 224))
        h, w = int(size[-2]), int(size[-1])
        x = torch.randn(2, 3, h, w)
        err2 = _runs(model, x)
        if err2 is not None:
            raise RuntimeError(f"runs neither at 64x64 ({err}) nor at {h}x{w} ({err2})")
        notes.append(f"example {h}x{w} (64x64: {err})")
    for oh, ow in ((h * 3 // 2, w * 5 // 4), (2 * h, 2 * w), (h, w)):
        other = torch.randn(3, 3, oh, ow)
        if _runs(model, other) is None:
            break
    if (oh, ow) == (h, w):
        notes.append(f"second input {oh}x{ow}: the model takes one size only")
    elif (oh, ow) != (h * 3 // 2, w * 5 // 4):
        notes.append(f"second input {oh}x{ow}")
    return x, other, "; ".join(notes)


_SIGMOID_FUNCS = {"sigmoid", "sigmoid_", "hardsigmoid", "hard_sigmoid", "hardsigmoid_"}
_SOFTMAX_FUNCS = {"softmax", "_softmax", "log_softmax"}
_PASS_THROUGH = {"view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "flatten",
                 "transpose", "permute", "contiguous", "to", "type_as", "float", "clone",
                 "getitem", "repeat", "unflatten", "sum"}
_MULS = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", "mul_out"}


def _fn_name(gm, n) -> str:
    """A node's operation as one lower-case word: the module class for call_module nodes, the
    function or method name otherwise."""
    if n.op == "call_module":
        try:
            return type(gm.get_submodule(str(n.target))).__name__.lower()
        except AttributeError:
            return ""
    if n.op == "call_method":
        return str(n.target).lower()
    if n.op == "call_function":
        return getattr(n.target, "__name__", str(n.target)).lower()
    return ""


def _is_sigmoid_like(gm, n) -> bool:
    name = _fn_name(gm, n)
    return name in _SIGMOID_FUNCS or (n.op == "call_module" and "sigmoid" in name)


def _is_softmax(gm, n) -> bool:
    name = _fn_name(gm, n)
    return name in _SOFTMAX_FUNCS or (n.op == "call_module" and name in ("softmax",
                                                                         "radixsoftmax"))


def record_shapes(gm, graph, x) -> dict:
    """Shapes of the nodes of ``graph`` (a graph of ``gm``) on input ``x``, eval mode, no grad.

    Returns:
        ``{node: torch.Size}`` for the nodes producing a tensor.
    """
    import torch
    import torch.fx as fx

    shapes: dict = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n] = out.shape
            return out

    gm.eval()
    with torch.no_grad():
        Rec(gm, graph=graph).run(x)
    return shapes


def analyse_deploy(deploy, x) -> dict[str, Any]:
    """What is left of attention and BatchNorm in a deploy model's eval graph.

    Returns:
        ``{"sigmoid_nodes", "softmax_nodes", "channel_gates", "other_gates", "psi",
        "bn_nodes", "bn_behind_conv", "bn_behind_conv_subclass", "bn_classes"}``: gates are
        sigmoid-like / softmax nodes whose output (through views, expands and the like) scales a
        map with more elements per sample than itself -- ``other_gates`` those shaped like a
        gate per position (``(N, 1, ..., W)``: a spatial half), ``channel_gates`` the rest (per
        channel, or per branch and channel); ``psi`` names every ``*psi`` parameter, buffer or
        attribute read; BatchNorm nodes are calls of ``_BatchNorm`` subclasses and
        ``batch_norm`` functions,
        ``bn_behind_conv`` those whose input an exact ``nn.Conv1d/2d/3d`` (or ``conv*d`` call)
        produces and nothing else reads -- what BN fusion could remove exactly
        (``bn_behind_conv_at``: the first 8 of those convs) --, ``bn_behind_shared_conv`` those
        behind an exact conv whose output is read elsewhere too (e.g. a pre-norm beside a
        shortcut), ``bn_behind_conv_subclass`` those behind a conv subclass (e.g.
        ``Conv2dSame``, ``StdConv2d``).
    """
    import torch
    from torch import nn

    graph = getattr(deploy, "eval_graph", None) or deploy.graph
    try:
        shapes = record_shapes(deploy, graph, x)
    except Exception:  # noqa: BLE001
        shapes = {}

    def numel(n) -> int:
        s = shapes.get(n)
        return int(math.prod(s[1:])) if s is not None and len(s) > 1 else 0

    sig = [n for n in graph.nodes if _is_sigmoid_like(deploy, n)]
    soft = [n for n in graph.nodes if _is_softmax(deploy, n)]
    channel_gates, other_gates = [], []
    for g in sig + soft:
        frontier, seen, scales = [g], set(), False
        while frontier and not scales:
            n = frontier.pop()
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                name = _fn_name(deploy, u)
                if name in _MULS:
                    others = [a for a in u.args if isinstance(a, type(g)) and a is not n]
                    if any(numel(a) > numel(n) for a in others):
                        scales = True
                        break
                if name in _PASS_THROUGH:
                    frontier.append(u)
        if scales:
            s = shapes.get(g)
            per_position = s is not None and len(s) > 2 and s[1] == 1 and s[-1] > 1
            (other_gates if per_position else channel_gates).append(g.name)

    psi = sorted({n for n, _ in deploy.named_parameters() if n.endswith("psi")}
                 | {n for n, _ in deploy.named_buffers() if n.endswith("psi")}
                 | {str(n.target) for n in graph.nodes
                    if n.op == "get_attr" and str(n.target).endswith("psi")})

    conv_exact = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    conv_funcs = {"conv1d", "conv2d", "conv3d"}
    bn_nodes, behind, behind_shared, behind_sub = 0, 0, 0, 0
    behind_at: list[str] = []
    classes: collections.Counter = collections.Counter()
    for n in graph.nodes:
        is_bn = False
        if n.op == "call_module":
            try:
                mod = deploy.get_submodule(str(n.target))
            except AttributeError:
                continue
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                is_bn = True
                classes[type(mod).__name__] += 1
        elif n.op == "call_function" and n.target in (torch.nn.functional.batch_norm,
                                                      torch.batch_norm):
            is_bn = True
            classes["F.batch_norm"] += 1
        if not is_bn or not n.args or not isinstance(n.args[0], type(n)):
            continue
        bn_nodes += 1
        src = n.args[0]
        if src.op == "call_module":
            try:
                smod = deploy.get_submodule(str(src.target))
            except AttributeError:
                continue
            if type(smod) in conv_exact:
                if len(src.users) == 1:
                    behind += 1
                    behind_at.append(str(src.target))
                else:
                    behind_shared += 1
            elif isinstance(smod, nn.modules.conv._ConvNd):
                behind_sub += 1
        elif src.op == "call_function" and _fn_name(deploy, src) in conv_funcs:
            if len(src.users) == 1:
                behind += 1
                behind_at.append(src.name)
            else:
                behind_shared += 1
    return {"sigmoid_nodes": len(sig), "softmax_nodes": len(soft),
            "channel_gates": channel_gates, "other_gates": other_gates, "psi": psi,
            "bn_nodes": bn_nodes, "bn_behind_conv": behind, "bn_behind_conv_at": behind_at[:8],
            "bn_behind_shared_conv": behind_shared, "bn_behind_conv_subclass": behind_sub,
            "bn_classes": dict(classes)}


def _sites(report, actions: Iterable[str]) -> list[dict[str, str]]:
    return [{"path": s.path, "kind": s.kind, "action": s.action, "code": s.code,
             "reason": (s.reason or "").splitlines()[0][:200] if s.reason else ""}
            for s in report.sites if s.action in actions]


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """prepare -> one SGD step -> fold for one model, measured (see the module docstring).

    Returns:
        the result row: the entry's fields plus what was measured; ``stage`` and ``error`` say
        where and what raised, if anything did (the row then holds what was measured before).
    """
    import torch
    from torch import nn

    import asrfx

    torch.set_num_threads(1)
    torch.manual_seed(0)
    res: dict[str, Any] = dict(spec)
    res.update(stage="build", error="", warnings=[])
    caught: list[str] = []

    def note_warnings(ws) -> None:
        for w in ws:
            line = str(w.message).strip().splitlines()[0][:200] if str(w.message).strip() else ""
            if line and line not in caught:
                caught.append(line)
        res["warnings"] = caught[:5]
        res["warning_count"] = len(caught)

    def timed(key: str, step):
        """``step()``, its wall time in ``res[key]`` (s), its warnings noted."""
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            out = step()
            res[key] = round(time.perf_counter() - t0, 3)
        note_warnings(ws)
        return out

    try:
        model = _build(spec["source"], spec["model"])
        res["params"] = int(sum(p.numel() for p in model.parameters()))
        res["attention"] = count_attention(model, attention_classes())
        res["attention_modules"] = sum(res["attention"].values())

        res["stage"] = "input"
        randomize_norms(model, 0)
        res["zero_weights_randomized"] = randomize_zero_weights(model, 0)
        x, other, note = pick_inputs(model, spec.get("input_size"))
        res["input"] = list(x.shape)
        res["other_input"] = list(other.shape)
        res["input_note"] = note

        res["stage"] = "prepare"
        prepared = timed("prepare_s", lambda: asrfx.prepare(model, example_inputs=(x,)))
        rep = prepared.asrfx_report
        res["converted"] = rep.count(action="converted")
        res["prepare_sites"] = _sites(rep, ("refused", "kept"))
        res["refused"] = rep.count(action="refused")
        res["psi_count"] = sum(1 for n, _ in prepared.named_parameters() if n.endswith("psi"))

        res["stage"] = "train"
        prepared.train()
        opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(1)
        xb = torch.randn(4, *x.shape[1:], generator=gen)
        yb = torch.randint(0, 10, (4,), generator=gen)
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            logits = _first_tensor(prepared(xb))
            loss = nn.functional.cross_entropy(logits.reshape(4, -1)[:, :10], yb)
            loss.backward()
            opt.step()
        note_warnings(ws)
        res["loss"] = float(loss.item())
        res["loss_finite"] = bool(math.isfinite(res["loss"]))
        psi_grads = [p.grad for n, p in prepared.named_parameters() if n.endswith("psi")]
        res["psi_with_grad"] = sum(1 for g in psi_grads if g is not None and bool((g != 0).any()))

        res["stage"] = "fold"
        randomize_norms(prepared, 1)
        randomize_psi(prepared, 2)
        deploy = timed("fold_s", lambda: asrfx.fold(prepared, example_inputs=(x,)))
        frep = deploy.asrfx_report
        res["fold_sites"] = _sites(frep, ("refused", "kept"))

        res["stage"] = "compare"
        prepared.eval()
        deploy.eval()
        errs = []
        with torch.no_grad():
            for xi in (x, other):
                errs.append(rel_err(_first_tensor(prepared(xi)), _first_tensor(deploy(xi))))
        res["errors"] = errs
        res["max_error"] = max(errs)
        res["exact"] = all(e <= TOL for e in errs)  # NaN compares False
        if not res["exact"] and all(math.isfinite(e) for e in errs):
            # as fold's own check does: an ill-conditioned float32 model is judged against
            # the prepared model run in float64 (exact when the fold errs within twice the
            # eager float32 run's own error, or within TOL)
            import copy

            ref64 = copy.deepcopy(prepared).double().eval()
            judged = []
            with torch.no_grad():
                for xi in (x, other):
                    truth = _first_tensor(ref64(xi.double()))
                    judged.append((rel_err(truth, _first_tensor(deploy(xi))),
                                   rel_err(truth, _first_tensor(prepared(xi)))))
            res["float64"] = judged
            # fold's check found the same fold exact in float64: the miss is float32 rounding
            same64 = any("the same fold computed in float64" in n for n in frep.notes)
            res["exact"] = same64 or all(f <= max(2 * e, TOL) for f, e in judged)

        res["stage"] = "analyse"
        res["deploy"] = analyse_deploy(deploy, x)
        res["stage"] = "done"
    except Exception as e:  # noqa: BLE001
        res["error"] = _error_text(e)
        res["error_kind"] = type(e).__name__
        res["traceback"] = traceback.format_exc().strip().splitlines()[-6:]
    return res


# ---------------------------------------------------------------------------------------------
# verdicts


def left_count(r: dict) -> int:
    """Gates and psi left in the deploy model, plus the fold report's rows saying that psi or a
    constant computation stayed."""
    d = r.get("deploy") or {}
    codes = [s["code"] for s in r.get("fold_sites", [])]
    return (len(d.get("channel_gates", [])) + len(d.get("other_gates", []))
            + len(d.get("psi", []))
            + sum(c in ("psi-left", "constant-computation-left") for c in codes))


def outcome(r: dict) -> str:
    """One word for a result row, the first that applies: ``timeout``, ``crash``,
    ``error:<stage>``, ``refused`` (``prepare`` refused a site, with a code),
    ``unconverted`` (fewer sites converted than attention modules, none refused: not found),
    ``inexact``, ``left`` (gate / psi left), ``nonfinite-loss``, ``ok``."""
    if r.get("timeout"):
        return "timeout"
    if r.get("crash"):
        return "crash"
    if r.get("stage") != "done":
        return f"error:{r.get('stage')}"
    if r.get("refused", 0):
        return "refused"
    if r.get("converted", 0) < r.get("attention_modules", 0) or r.get("converted", 0) == 0:
        return "unconverted"
    if not r.get("exact"):
        return "inexact"
    if left_count(r):
        return "left"
    if not r.get("loss_finite"):
        return "nonfinite-loss"
    return "ok"


def _codes(r: dict, which: str = "both") -> str:
    """The kept / refused rows of a result's reports as ``"<action> <code> xN"``: of
    ``prepare`` (attention sites), of ``fold`` (scales, BatchNorms, merges), or ``both``."""
    rows = ((r.get("prepare_sites", []) if which in ("prepare", "both") else [])
            + (r.get("fold_sites", []) if which in ("fold", "both") else []))
    c = collections.Counter(f"{s['action']} {s['code'] or '?'}" for s in rows
                            if s["action"] in ("refused", "kept"))
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(c.items()))


def summarise(results: list[dict]) -> dict[str, Any]:
    """The summary numbers of a sweep.

    Returns:
        a dict: families fully OK / total (a family counts by its main model), extras fully
        OK / total, attention modules converted / total (per model at most its module count),
        sites converted, models with BatchNorm left and with BatchNorm behind an exact conv,
        outcomes, error kinds and report codes.
    """
    main = [r for r in results if not r.get("extra")]
    extras = [r for r in results if r.get("extra")]
    mods = sum(r.get("attention_modules", sum((r.get("attention") or {}).values()))
               for r in results)
    conv = sum(min(r.get("converted", 0), r.get("attention_modules", 0)) for r in results)
    bn_left = [r["model"] for r in results if (r.get("deploy") or {}).get("bn_nodes")]
    bn_conv = [r["model"] for r in results if (r.get("deploy") or {}).get("bn_behind_conv")]
    bn_shared = [r["model"] for r in results
                 if (r.get("deploy") or {}).get("bn_behind_shared_conv")]
    bn_sub = [r["model"] for r in results
              if (r.get("deploy") or {}).get("bn_behind_conv_subclass")]
    kinds = collections.Counter(r.get("error_kind") or ("Timeout" if r.get("timeout") else
                                                       "Crash")
                                for r in results if r.get("stage") != "done")
    codes: dict[str, collections.Counter] = {"prepare": collections.Counter(),
                                             "fold": collections.Counter()}
    for r in results:
        for stage in ("prepare", "fold"):
            for s in r.get(f"{stage}_sites", []):
                codes[stage][f"{s['action']} {s['code'] or '?'}"] += 1
    return {
        "families_ok": sum(outcome(r) == "ok" for r in main), "families": len(main),
        "extras_ok": sum(outcome(r) == "ok" for r in extras), "extras": len(extras),
        "models_ok": sum(outcome(r) == "ok" for r in results), "models": len(results),
        "attention_converted": conv, "attention_modules": mods,
        "sites_converted": sum(r.get("converted", 0) for r in results),
        "bn_left_models": bn_left, "bn_behind_conv_models": bn_conv,
        "bn_behind_shared_conv_models": bn_shared, "bn_behind_conv_subclass_models": bn_sub,
        "outcomes": dict(collections.Counter(outcome(r) for r in results).most_common()),
        "error_kinds": dict(kinds.most_common()),
        "prepare_codes": dict(codes["prepare"].most_common()),
        "fold_codes": dict(codes["fold"].most_common()),
    }


def summary_lines(s: dict) -> list[str]:
    """The summary as lines of text (also the summary section of the Markdown file)."""
    lines = [
        f"families fully OK: {s['families_ok']} / {s['families']}"
        + (f" (extras: {s['extras_ok']} / {s['extras']}; models: {s['models_ok']} / "
           f"{s['models']})" if s["extras"] else ""),
        f"attention modules converted: {s['attention_converted']} / {s['attention_modules']}"
        f" ({s['sites_converted']} sites converted in all)",
        f"models with BatchNorm left: {len(s['bn_left_models'])}; with BatchNorm right behind "
        f"an exact conv it alone reads: {len(s['bn_behind_conv_models'])}; behind an exact conv "
        f"read elsewhere too: {len(s.get('bn_behind_shared_conv_models', []))}; behind a conv "
        f"subclass: {len(s['bn_behind_conv_subclass_models'])}",
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in s["outcomes"].items()),
    ]
    if s["error_kinds"]:
        lines.append("errors by kind: " + ", ".join(f"{k} {v}"
                                                    for k, v in s["error_kinds"].items()))
    for stage in ("prepare", "fold"):
        if s[f"{stage}_codes"]:
            lines.append(f"{stage} report rows kept / refused by code: "
                         + ", ".join(f"{k} x{v}" for k, v in s[f"{stage}_codes"].items()))
    return lines


def _fmt_err(r: dict) -> str:
    if "errors" not in r:
        return "-"
    e = r["max_error"]
    mark = "yes" if r.get("exact") else "**no**"
    if r.get("float64"):
        fold64 = max(f for f, _ in r["float64"])
        eager64 = max(g for _, g in r["float64"])
        return f"{mark} ({e:.1e}; vs float64: fold {fold64:.1e}, eager {eager64:.1e})"
    return f"{mark} ({e:.1e})"


def markdown(results: list[dict], s: dict, meta: dict) -> str:
    """The Markdown report: header, summary, one row per model (by family), and the notes of
    the rows that are not fully OK.

    Returns:
        the text.
    """
    out = ["# asrfx zoo sweep: timm families with channel attention, torchvision SE models", ""]
    out += [f"{meta['when']}; torch {meta['torch']}, timm {meta['timm']}, torchvision "
            f"{meta['torchvision']}; CPU, one torch thread per model, timeout "
            f"{meta['timeout']:.0f} s; {meta['wall_s'] / 60:.1f} min in all. Each model: random "
            "weights, 10 classes, example 2x3x64x64 (the pretrained input size where 64 "
            "fails), norms and zero weights randomised, `prepare`, one SGD step (lr 0.01, "
            "batch 4), norms and psi randomised, `fold`, eval outputs compared on the example "
            "and on a batch of 3 at another size. Generated by `bench/zoo_sweep.py`.", ""]
    for rr in meta.get("reruns", []):
        out += [f"Re-run on {rr['when']} (`--merge`, {rr['wall_s'] / 60:.1f} min), replacing "
                "their rows: " + ", ".join(f"`{m}`" for m in rr["models"]) + ".", ""]
    out += ["## Summary", ""] + [f"- {line}" for line in summary_lines(s)] + [""]
    out += ["Fully OK: every attention module converted and nothing refused, exact (relative "
            f"error <= {TOL:g} on both inputs), no gate or psi left, finite loss. *attn*: "
            "channel-attention modules in the model; *conv.*: sites `prepare` converted; *psi "
            "trained*: psi with a nonzero gradient after the training step / psi; *left*: gates "
            "(sigmoid-like / softmax nodes scaling a map) + psi left in the deploy graph; *BN "
            "(conv)*: BatchNorm calls left (of them right behind an exact conv that nothing else "
            "reads: fusable); *fold: kept*: "
            "the fold report's kept rows by code (scales, BatchNorms and merges left as they "
            "were). Extras (marked +) are other kinds of model in a family.", ""]
    out += ["## Models", ""]
    out += ["| family | model | params | attn | conv. | prepare: kept / refused | psi trained | "
            "exact (err) | left | BN (conv) | fold: kept | loss | prepare s | fold s | outcome |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        d = r.get("deploy") or {}
        bn = f"{d['bn_nodes']} ({d['bn_behind_conv']})" if d else "-"
        loss = f"{r['loss']:.3g}" if "loss" in r else "-"
        oc = outcome(r)
        out.append("| " + " | ".join([
            f"{r['source']}:{r['family']}", ("+ " if r.get("extra") else "") + f"`{r['model']}`",
            f"{r.get('params', 0) / 1e6:.2f}M",
            str(r.get("attention_modules", sum((r.get("attention") or {}).values()))),
            str(r.get("converted", "-")), _codes(r, "prepare") or "-",
            f"{r['psi_with_grad']}/{r['psi_count']}" if "psi_with_grad" in r else "-",
            _fmt_err(r),
            str(left_count(r)) if d else "-", bn, _codes(r, "fold") or "-", loss,
            f"{r['prepare_s']:.1f}" if "prepare_s" in r else "-",
            f"{r['fold_s']:.1f}" if "fold_s" in r else "-",
            oc if oc == "ok" else f"**{oc}**"]) + " |")
    bad = [r for r in results if outcome(r) != "ok"]
    if bad:
        out += ["", "## Not fully OK", ""]
        for r in bad:
            why = [outcome(r)]
            if r.get("error"):
                why.append(f"{r['stage']}: {r['error']}")
            if _codes(r, "prepare"):
                why.append("prepare: " + _codes(r, "prepare"))
            d = r.get("deploy") or {}
            if d.get("bn_nodes"):
                bn_classes = ", ".join(f"{k} x{v}" for k, v in d["bn_classes"].items())
                why.append(f"{d['bn_nodes']} BatchNorm left ({d['bn_behind_conv']} behind an "
                           f"exact conv only they read; {bn_classes})")
            if d.get("channel_gates") or d.get("other_gates"):
                why.append(f"{len(d['channel_gates'])} channel gate(s) and "
                           f"{len(d['other_gates'])} per-position gate(s) left")
            if d.get("psi"):
                why.append(f"{len(d['psi'])} psi left")
            if "attention_modules" in r and r.get("converted", 0) < r["attention_modules"]:
                why.append(f"converted {r.get('converted', 0)} of {r['attention_modules']} "
                           f"({', '.join(f'{k} x{v}' for k, v in r['attention'].items())})")
            if r.get("errors") and not r.get("exact"):
                why.append("errors " + ", ".join(f"{e:.2e}" for e in r["errors"]))
            out.append(f"- `{r['model']}` ({r['family']}): " + "; ".join(why))
    bn = [r for r in results if (r.get("deploy") or {}).get("bn_nodes")]
    if bn:
        out += ["", "## BatchNorm left in the deploy graph", "",
                "| model | BN calls | by class | behind an exact conv it alone reads (convs) | "
                "behind an exact conv read elsewhere | behind a conv subclass |",
                "|---|---|---|---|---|---|"]
        for r in bn:
            d = r["deploy"]
            at = ", ".join(f"`{a}`" for a in d.get("bn_behind_conv_at", []))
            out.append(f"| `{r['model']}` | {d['bn_nodes']} | "
                       + ", ".join(f"{k} x{v}" for k, v in d["bn_classes"].items())
                       + f" | {d['bn_behind_conv']}" + (f" ({at})" if at else "")
                       + f" | {d.get('bn_behind_shared_conv', '?' if d['bn_behind_conv'] else 0)}"
                       + f" | {d['bn_behind_conv_subclass']} |")
    notes = [r for r in results if r.get("input_note")]
    if notes:
        out += ["", "## Inputs changed", ""]
        out += [f"- `{r['model']}`: {r['input_note']}" for r in notes]
    return "\n".join(out) + "\n"


def chart(results: list[dict], path: Path) -> bool:
    """A bar chart of outcomes (and of models with BatchNorm left) to ``path``.

    Returns:
        False when matplotlib is not installed (nothing written), True otherwise.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    counts = collections.Counter(outcome(r) for r in results)
    order = ["ok"] + sorted(k for k in counts if k != "ok")
    colours = ["tab:green" if k == "ok" else "tab:red" if k.startswith(("error", "crash",
                                                                         "timeout"))
               else "tab:orange" for k in order]
    bn = [sum(1 for r in results if (r.get("deploy") or {}).get(k))
          for k in ("bn_nodes", "bn_behind_conv", "bn_behind_shared_conv",
                    "bn_behind_conv_subclass")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    a1.barh(order[::-1], [counts[k] for k in order][::-1], color=colours[::-1])
    a1.set_xlabel("models")
    a1.set_xlim(0, max(counts.values()) * 1.12 + 1)
    a1.xaxis.get_major_locator().set_params(integer=True)
    a1.set_title(f"asrfx on {len(results)} zoo models: outcome")
    for i, k in enumerate(order[::-1]):
        a1.text(counts[k], i, f" {counts[k]}", va="center")
    labels = ["any", "behind\nexact conv", "behind\nshared conv", "behind conv\nsubclass"]
    a2.bar(labels, bn, color="tab:gray")
    a2.set_ylim(0, max(bn + [1]) * 1.18)
    a2.tick_params(axis="x", labelsize=8)
    a2.yaxis.get_major_locator().set_params(integer=True)
    a2.set_title("models with BatchNorm left")
    for i, v in enumerate(bn):
        a2.text(i, v, str(v), ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# driver


def run_isolated(spec: dict, timeout: float) -> dict[str, Any]:
    """:func:`run_one` for ``spec`` in a fresh interpreter (one torch thread), killed after
    ``timeout`` seconds.

    Returns:
        the result row; on a timeout or a crash the entry's fields with ``timeout`` / ``crash``
        set and the last lines of the output.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="zoo-sweep-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec),
               "--worker-out", str(out)]
        t0 = time.perf_counter()
        with open(Path(tmp) / "log.txt", "w+") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env)
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                timed_out = True
            log.seek(0)
            tail = log.read().strip().splitlines()[-8:]
        wall = round(time.perf_counter() - t0, 1)
        if out.exists() and not timed_out:
            res = json.loads(out.read_text())
        else:
            res = dict(spec, stage="crash" if not timed_out else "timeout",
                       error=(f"timed out after {timeout:.0f} s" if timed_out else
                              f"exit status {proc.returncode}"),
                       error_kind="Timeout" if timed_out else "Crash", log_tail=tail)
            res["timeout" if timed_out else "crash"] = True
        res["wall_s"] = wall
        return res


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring).

    Returns:
        the exit status: 0 when the sweep ran (whatever its outcomes), 2 for bad arguments.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results", help="results folder (bench/results)")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="sweep only these models or families (timm or torchvision names)")
    p.add_argument("--families", type=int, metavar="N",
                   help="only the first N families (a quick check)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds per model (default {DEFAULT_TIMEOUT:.0f})")
    p.add_argument("--jobs", type=int, default=1, choices=[1],
                   help="models run one at a time (the only choice)")
    p.add_argument("--refresh", action="store_true", help="redo the enumeration")
    p.add_argument("--merge", action="store_true",
                   help="run the selected models (--only) again and replace their rows in the "
                        "existing results; the report is rewritten and names the re-run")
    p.add_argument("--list", action="store_true", help="print the models to sweep and stop")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the Markdown report and chart from the existing results")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        res = run_one(json.loads(args.worker))
        Path(args.worker_out).write_text(json.dumps(res))
        return 0

    out_dir = Path(args.out)
    if args.report_only:
        old = _load_json(out_dir / RESULTS_JSON)
        if not old.get("results"):
            print(f"--report-only: no results in {out_dir / RESULTS_JSON}")
            return 2
        s = summarise(old["results"])
        _write_json(out_dir / RESULTS_JSON, old | {"summary": s})
        (out_dir / RESULTS_MD).write_text(markdown(old["results"], s, old["meta"]))
        chart(old["results"], out_dir / RESULTS_PNG)
        print("\n".join(summary_lines(s)))
        return 0

    import torch

    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print("enumerating timm and torchvision models (meta device) ...", flush=True)
    cache = enumerate_models(out_dir / MODELS_JSON, refresh=args.refresh,
                             families_wanted=args.families if not args.only else None,
                             log=lambda s: print(s, flush=True))
    entries = select_models(cache)
    if args.only:
        wanted = set(args.only)

        def hit(e: dict) -> bool:
            return bool({e["model"], e["family"], f"{e['source']}:{e['model']}"} & wanted)

        picked = [e for e in entries if hit(e)]
        for name in sorted(wanted - {w for e in picked for w in (
                e["model"], e["family"], f"{e['source']}:{e['model']}")}):
            keys = [name] if ":" in name else [f"timm:{name}", f"torchvision:{name}"]
            key = next((k for k in keys if "params" in cache["models"].get(k, {})), None)
            if key is None:
                print(f"not found (or not buildable): {name}")
                continue
            info = cache["models"][key]
            picked.append({"source": key.split(":", 1)[0], "family": family_of(
                               key.split(":", 1)[1]),
                           "model": key.split(":", 1)[1], "params": info["params"],
                           "attention": info["attention"], "module": info["module"],
                           "input_size": info["input_size"], "extra": True})
        entries = picked
    if args.families:
        fams: list[tuple[str, str]] = []
        for e in entries:
            if (e["source"], e["family"]) not in fams:
                fams.append((e["source"], e["family"]))
        keep = set(fams[:args.families])
        entries = [e for e in entries if (e["source"], e["family"]) in keep]
    print(f"{len(entries)} models in {len({(e['source'], e['family']) for e in entries})} "
          f"families", flush=True)
    if args.list:
        for e in entries:
            print(f"  {e['source']:11s} {e['family']:24s} {e['model']:32s} "
                  f"{e['params'] / 1e6:7.2f}M {'extra ' if e['extra'] else ''}"
                  f"{', '.join(f'{k} x{v}' for k, v in e['attention'].items())}")
        return 0

    import timm
    import torchvision

    meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
            "timm": timm.__version__, "torchvision": torchvision.__version__,
            "timeout": args.timeout, "wall_s": 0.0,
            "args": argv if argv is not None else sys.argv[1:]}
    previous: list[dict] = []
    if args.merge:
        old = _load_json(out_dir / RESULTS_JSON)
        if not old.get("results"):
            print(f"--merge: no results in {out_dir / RESULTS_JSON} to merge into")
            return 2
        previous = old["results"]
        rerun = {"when": meta["when"], "models": [e["model"] for e in entries], "wall_s": 0.0}
        meta = old["meta"]
        meta.setdefault("reruns", []).append(rerun)

    def merged(new: list[dict]) -> list[dict]:
        by_key = {(r["source"], r["model"]): r for r in new}
        rows = [by_key.pop((r["source"], r["model"]), r) for r in previous]
        return rows + [r for r in new if (r["source"], r["model"]) in by_key]

    results: list[dict] = []
    for i, spec in enumerate(entries, 1):
        res = run_isolated(spec, args.timeout)
        results.append(res)
        d = res.get("deploy") or {}
        print(f"[{i}/{len(entries)}] {spec['model']:32s} {outcome(res):16s} "
              f"attn {res.get('attention_modules', '-')} conv {res.get('converted', '-')} "
              f"err {res.get('max_error', float('nan')):.1e} left {left_count(res)} "
              f"BN {d.get('bn_nodes', '-')}/{d.get('bn_behind_conv', '-')} "
              f"{res['wall_s']:.0f} s {res.get('error', '')}", flush=True)
        if args.merge:
            meta["reruns"][-1]["wall_s"] = time.perf_counter() - t_start
        else:
            meta["wall_s"] = time.perf_counter() - t_start
        _write_json(out_dir / RESULTS_JSON, {"meta": meta, "partial": i < len(entries),
                                             "results": merged(results)})
    if args.merge:
        meta["reruns"][-1]["wall_s"] = time.perf_counter() - t_start
    else:
        meta["wall_s"] = time.perf_counter() - t_start
    results = merged(results)
    s = summarise(results)
    _write_json(out_dir / RESULTS_JSON, {"meta": meta, "partial": False, "summary": s,
                                         "results": results})
    (out_dir / RESULTS_MD).write_text(markdown(results, s, meta))
    drew = chart(results, out_dir / RESULTS_PNG)
    print("\n".join(["", "summary"] + [f"  {line}" for line in summary_lines(s)]))
    print(f"wrote {out_dir / RESULTS_MD}, {out_dir / RESULTS_JSON}"
          + (f", {out_dir / RESULTS_PNG}" if drew else " (no chart: matplotlib not installed)")
          + f" in {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0

if __name__ == "__main__":
    sys.exit(main())
