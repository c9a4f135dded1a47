"""Reports attached to prepared and folded models (``gm.asrfx_report``)."""

from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Any

from tabulate import tabulate

__all__ = ["Site", "Report"]


@dataclass
class Site:
    """One place in the graph a pass looked at.

    Attributes:
        path: module path of the site (the attention module, or the op's enclosing module).
        kind: what was found, e.g. "channel-attention", "scale", "conv+bn".
        channels: number of channels the site acts on (0 if not applicable).
        action: what happened: "converted", "added", "folded", "fused", "kept", "refused", ...
        target: where it went (module or parameter the constant was folded into), if anywhere.
        reason: why a site was refused or kept, empty when it went through.
        code: a short, stable, machine-readable name of the reason (e.g.
            ``"batch-stats-norm-in-branch"``); every kept or refused site has one. Tests and
            tools match it rather than the prose.
        key: the pass's name for this place in the graph (e.g. ``"bn:<node>"``), with which
            the pipeline re-runs a pass on this site alone; empty where there is none.
        form: for attention sites, what the gate is (``"sigmoid gate"``, ``"softmax gate"``,
            ``"additive context"``, ``"unbounded gate"``, ...): a user choosing which sites
            to convert (``prepare(sites=...)``) reads it.
        group: records of one group (e.g. constant scales that are not attention) are printed
            as one summary line; each is still in ``sites``.
    """

    path: str
    kind: str
    channels: int = 0
    action: str = ""
    target: str = ""
    reason: str = ""
    code: str = ""
    key: str = field(default="", repr=False)
    form: str = ""
    group: str = field(default="", repr=False)


@dataclass
class Report:
    """What a call to :func:`asrfx.prepare` or :func:`asrfx.fold` did.

    ``print(report)`` shows a table of sites and the parameter counts.
    """

    stage: str
    sites: list[Site] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, *args: Any, **kwargs: Any) -> Site:
        site = Site(*args, **kwargs)
        self.sites.append(site)
        return site

    def extend(self, records: list[Site]) -> None:
        """Append passes' records. A site one pass kept and another pass handled (e.g. an
        identity-BatchNorm branch that fusion keeps and branch merging absorbs: the same path
        and kind, keys of different passes, ``bn:`` and ``merge:``) is reported once, by its
        final outcome: the later record replaces the earlier "kept" one. Records of one pass
        never replace each other (two scales of one module, one kept and one folded, are two
        rows)."""
        def pass_of(site: Site) -> str:
            return site.key.partition(":")[0]

        # (path, kind) -> positions of the "kept" records with a key, in order: each record
        # finds the one it replaces without scanning every site (linear in the sites)
        kept: dict[tuple[str, str], list[int]] = {}
        for i, old in enumerate(self.sites):
            if old.action == "kept" and old.key:
                kept.setdefault((old.path, old.kind), []).append(i)
        for rec in records:
            if rec.action != "kept" and rec.key:
                slots = kept.get((rec.path, rec.kind), [])
                for j, i in enumerate(slots):
                    if pass_of(self.sites[i]) != pass_of(rec):
                        self.sites[i] = rec
                        del slots[j]
                        break
                else:
                    self.sites.append(rec)
            else:
                if rec.action == "kept" and rec.key:
                    kept.setdefault((rec.path, rec.kind), []).append(len(self.sites))
                self.sites.append(rec)

    def count(self, action: str | None = None, kind: str | None = None) -> int:
        """Number of sites with the given action and/or kind."""
        return sum(1 for s in self.sites
                   if (action is None or s.action == action) and (kind is None or s.kind == kind))

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "sites": [asdict(s) for s in self.sites],
                "params_before": self.params_before, "params_after": self.params_after,
                "notes": list(self.notes)}

    def __str__(self) -> str:
        rows, groups = [], {}
        for s in self.sites:
            if s.group:
                if s.group not in groups:
                    groups[s.group] = []
                    rows.append(s.group)  # placeholder: the group's line goes here
                groups[s.group].append(s)
            else:
                kind = f"{s.kind} ({s.form})" if s.form else s.kind
                rows.append([s.path or "(top)", kind, s.channels or "", s.action, s.target,
                             s.reason])
        rows = [_group_row(r, groups[r]) if isinstance(r, str) else r for r in rows]
        table = tabulate(rows, headers=["site", "kind", "C", "action", "into", "reason"]) if rows \
            else "(no sites)"
        counts: dict[str, int] = {}
        for s in self.sites:
            counts[s.action] = counts.get(s.action, 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "nothing to do"
        lines = [f"asrfx {self.stage}: {summary}", table,
                 f"parameters: {self.params_before:,} -> {self.params_after:,}"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _group_row(name: str, sites: list[Site]) -> list:
    """One table row for a group of records: counts by action and by code, a few paths."""
    actions: dict[str, int] = {}
    codes: dict[str, int] = {}
    for s in sites:
        actions[s.action] = actions.get(s.action, 0) + 1
        if s.code:
            codes[s.code] = codes.get(s.code, 0) + 1
    paths = sorted({s.path or "(top)" for s in sites})
    where = ", ".join(paths[:3]) + (f", ... ({len(paths)} places)" if len(paths) > 3 else "")
    why = "; ".join(f"{v} {k}" for k, v in sorted(codes.items()))
    return [where, name, "", ", ".join(f"{v} {k}" for k, v in sorted(actions.items())), "",
            why]
