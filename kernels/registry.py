"""Named registries of the variants of fastpo's ops: one place per decision.

Each variant family (policy-loss types, KL estimators, aggregation modes, advantage
estimators, preference-loss types) is a :class:`Registry`. A variant is registered once,
next to its torch reference implementation, with

* ``name``: what users pass (``kl_kind="k3"``, ``loss_type="dapo"``, ...);
* ``kernel_id``: the int that the Triton branches switch on (None when the variant has
  no kernel branch of its own); the kernels check ids exhaustively, so an id without a
  branch fails when the kernel is compiled, never silently computing another variant;
* ``reference``: the torch implementation (the ``"torch"`` backend and the reference the
  Triton kernels are tested against);
* ``doc``: one line, and ``peers``: the peer options it matches;
* ``params``: family-specific facts (e.g. a loss type's default aggregation).

Engine configs, ``--help``, the tests' parameter lists and the docs' option tables derive
their choices from :meth:`Registry.names`. The registries themselves live in the op
modules (``fastpo.kernels.policy``, ``.advantages``, ``.preference``) and are exported
from ``fastpo.kernels``.
"""

from __future__ import annotations

import difflib
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping


@dataclass(frozen=True)
class Variant:
    """One registered variant; see the module docstring for the fields."""

    name: str
    kernel_id: int | None
    reference: Callable
    doc: str
    peers: str
    params: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))


class Registry:
    """An ordered, append-only table of :class:`Variant` s of one family.

    Args:
        name: the registry's public name (``"KL_ESTIMATORS"``), used in error messages.
        option: the argument its names are passed as (``"kl_kind"``), the default
            argument name of :meth:`check`'s errors.
    """

    def __init__(self, name: str, option: str):
        self.name = name
        self.option = option
        self._variants: dict[str, Variant] = {}

    def register(self, name: str, *, kernel_id: int | None, doc: str, peers: str = "", **params):
        """Decorator registering the decorated function as ``name``'s torch reference."""

        def add(reference: Callable) -> Callable:
            self.add(Variant(name, kernel_id, reference, doc, peers, types.MappingProxyType(dict(params))))
            return reference

        return add

    def add(self, variant: Variant) -> Variant:
        if variant.name in self._variants:
            raise ValueError(f"{self.name}: {variant.name!r} is already registered")
        if variant.kernel_id is not None:
            for other in self._variants.values():
                if other.kernel_id == variant.kernel_id and other.reference is not variant.reference:
                    raise ValueError(
                        f"{self.name}: kernel_id {variant.kernel_id} of {variant.name!r} is already the id of "
                        f"{other.name!r}, whose reference differs"
                    )
        self._variants[variant.name] = variant
        return variant

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._variants)

    def get(self, name: str, option: str | None = None) -> Variant:
        """The variant called ``name``; ValueError naming the option, the value, the
        allowed names and the closest match otherwise."""
        variant = self._variants.get(name) if isinstance(name, str) else None
        if variant is None:
            allowed = ", ".join(repr(n) for n in self._variants)
            message = f"{option or self.option}={name!r} is not one of {allowed} (fastpo.kernels.{self.name})"
            close = difflib.get_close_matches(str(name), self._variants, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
            raise ValueError(message)
        return variant

    def check(self, name: str, option: str | None = None) -> str:
        """``name`` if registered, else the ValueError of :meth:`get`."""
        return self.get(name, option).name

    def kernel_id(self, name: str) -> int:
        variant = self.get(name)
        if variant.kernel_id is None:
            raise ValueError(f"{self.name}: {name!r} has no kernel branch")
        return variant.kernel_id

    def __iter__(self) -> Iterator[Variant]:
        return iter(tuple(self._variants.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._variants

    def __len__(self) -> int:
        return len(self._variants)

    def __repr__(self) -> str:
        return f"Registry({self.name}: {', '.join(self._variants)})"
