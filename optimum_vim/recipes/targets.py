"""Target / skip / override resolution, in one place for every recipe.

:class:`Targets` holds the config's top-level bits, ``modules_to_not_convert`` and ``overrides``; it answers, for a
module name, whether the module stays float and otherwise its :class:`LayerSettings`, and it selects a model's linears
by role, its mixers and its scans through the model's family adapter. Recipes receive a ``Targets`` (not the config).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..models.family import LinearRef, MixerRef, ScanRef, family_of


@dataclass(frozen=True)
class LayerSettings:
    """Bits of one quantized module after the overrides."""

    weight_bits: int
    act_bits: int | None
    group_size: int | None


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    leaf = name.rsplit(".", 1)[-1]
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(leaf, pattern) or name.endswith("." + pattern)


def is_skipped(name: str, skip: Iterable[str] | None) -> bool:
    """``modules_to_not_convert`` semantics: a module is skipped when an entry matches its full name, its leaf name
    (glob) or a dotted suffix, or when it lies inside a skipped module."""
    if not skip:
        return False
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(_matches(p, pat) for pat in skip for p in prefixes)


def layer_overrides(name: str, overrides: Mapping | None) -> dict:
    """Merged per-module settings from the config's ``overrides`` (later patterns win); ``{"skip": True}`` or a
    None value means "leave in float"."""
    merged: dict = {}
    for pattern, value in (overrides or {}).items():
        if _matches(name, pattern):
            if value is None:
                return {"skip": True}
            merged.update(value)
    return merged


@dataclass(frozen=True)
class Targets:
    """What a run quantizes: the config's bits, skips (``modules_to_not_convert``) and per-module ``overrides``."""

    weight_bits: int
    act_bits: int | None = None
    group_size: int | None = None
    skip: tuple[str, ...] = ()
    overrides: Mapping[str, dict | None] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config) -> Targets:
        return cls(config.weight_bits, config.act_bits, config.weight_group_size,
                   tuple(config.modules_to_not_convert or ()), dict(config.overrides or {}))

    def skipped(self, name: str) -> bool:
        """Whether module ``name`` stays float (``modules_to_not_convert``, or an override None / ``skip``)."""
        return is_skipped(name, self.skip) or bool(layer_overrides(name, self.overrides).get("skip"))

    def settings(self, name: str) -> LayerSettings | None:
        """The bits of module ``name`` after the overrides; None when it stays float."""
        if self.skipped(name):
            return None
        over = layer_overrides(name, self.overrides)
        return LayerSettings(over.get("weight_bits", self.weight_bits), over.get("act_bits", self.act_bits),
                             over.get("weight_group_size", self.group_size))

    def weight_widths(self) -> set[int]:
        """Every weight width the config can give a module (top level and overrides)."""
        return {self.weight_bits} | {v["weight_bits"] for v in self.overrides.values()
                                     if v and not v.get("skip") and "weight_bits" in v}

    # ---------------------------------------------------------------------------------------------- selection
    def linears(self, model: nn.Module, roles: Iterable[str] | None = None) -> dict[str, LayerSettings]:
        """The model's linears whose role is in ``roles`` (None: the family's default linears) and that are not skipped,
        in model order, with their settings."""
        return {ref.name: s for ref in self.linear_refs(model, roles) if (s := self.settings(ref.name)) is not None}

    def linear_refs(self, model: nn.Module, roles: Iterable[str] | None = None) -> list[LinearRef]:
        """Like :meth:`linears`, the :class:`~optimum_vim.models.family.LinearRef` of each (role, scan order)."""
        family = family_of(model)
        refs = family.linears(model)
        if roles is not None:  # the config check accepts the roles of every family; this model has its own
            missing = sorted(set(roles) - {ref.role for ref in refs})
            if missing:
                raise ValueError(f"targets {missing} name no linear of this {family.model_type} model; its linear "
                                 f"roles: {', '.join(dict.fromkeys(ref.role for ref in refs))}")
        roles = set(family.default_linear_roles if roles is None else roles)
        return [ref for ref in refs if ref.role in roles and not self.skipped(ref.name)]

    def mixers(self, model: nn.Module) -> list[MixerRef]:
        """The model's mixers that are not skipped as a whole."""
        return [m for m in family_of(model).mixers(model) if not self.skipped(m.name)]

    def scans(self, model: nn.Module) -> dict[str, tuple[ScanRef, LayerSettings]]:
        """The model's float selective scans that are not skipped, with their settings."""
        return {ref.name: (ref, s) for ref in family_of(model).scans(model)
                if (s := self.settings(ref.name)) is not None}


def check_roles(roles: Iterable[str], recipe: str) -> None:
    """Refuses ``targets`` that name no mixer linear of any registered model family (checked again against the
    model's own family when the recipe runs)."""
    from ..models.family import known_roles

    known = known_roles()
    allowed = {r for rs in known.values() for r in rs}
    unknown = [t for t in roles if t not in allowed]
    if unknown:
        listed = "; ".join(f"{t}: {', '.join(rs)}" for t, rs in known.items())
        raise ValueError(f"{recipe} targets must be block linears ({listed}); got {unknown}")
