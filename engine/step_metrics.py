"""Metrics of an optimizer step: declared per micro-batch as tensors, reduced once per step.

An algorithm's ``loss_fn`` returns, beside its loss, a dict of metrics for its micro-batch.
Each value declares how the step reduces it over its micro-batches (and, under torchrun,
over the ranks):

=========================  ============================================================
value                      logged for the step
=========================  ============================================================
``mean(total)``, or a      ``sum(total) / N``: a mean over the step's ``N`` units (the
plain tensor or number     loss's unit: completion token, pair, ...); ``total`` is the
                           micro-batch's sum over its units
``mean(total, count)``,    ``sum(total) / max(sum(count), 1)``: a mean over something
or a pair                  else than the unit (per completion in a token loss, ...)
``(total, count)``
``maximum(value)``         the largest ``value`` of the step's micro-batches
``minimum(value)``         the smallest
``total(value)``           ``sum(value)``
=========================  ============================================================

``StepMetrics`` collects them with tensor operations only: nothing leaves the device
while the micro-batches run (a ``float()`` per metric and micro-batch would wait for the
device each time). ``reduce`` then combines the ranks (one all-reduce per kind of
reduction: sum, max, min) and copies every value of the step to the host in one
transfer. Sums accumulate in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["REDUCTIONS", "Metric", "StepMetrics", "maximum", "mean", "minimum", "total"]

REDUCTIONS = ("mean", "sum", "max", "min")


@dataclass(frozen=True)
class Metric:
    """One micro-batch's value of a metric and how the step reduces it.

    Attributes:
        value: a 0-d tensor or a number: the micro-batch's sum (``mean``, ``sum``) or its
            extreme (``max``, ``min``).
        count: for ``mean`` only: what ``value`` is a sum over; None means the loss's units.
        reduce: one of ``REDUCTIONS``.
    """

    value: torch.Tensor | float
    count: torch.Tensor | float | None = None
    reduce: str = "mean"

    def __post_init__(self):
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce={self.reduce!r} is not one of {', '.join(REDUCTIONS)}")
        if self.count is not None and self.reduce != "mean":
            raise ValueError(f"a count applies to reduce='mean' only, not {self.reduce!r}")


def mean(value, count=None) -> Metric:
    """A mean over the step: ``value`` is this micro-batch's sum over ``count`` items
    (None: over the loss's units)."""
    return Metric(value, count, "mean")


def maximum(value) -> Metric:
    """The step's largest value (of the micro-batches and ranks)."""
    return Metric(value, None, "max")


def minimum(value) -> Metric:
    """The step's smallest value."""
    return Metric(value, None, "min")


def total(value) -> Metric:
    """The step's sum."""
    return Metric(value, None, "sum")


def as_metric(value) -> Metric:
    """``value`` as a ``Metric``: a pair ``(total, count)`` is a mean over ``count``,
    a bare value a mean over the units."""
    if isinstance(value, Metric):
        return value
    if isinstance(value, tuple):
        total_, count = value
        return Metric(total_, count, "mean")
    return Metric(value, None, "mean")


_COMBINE = {"mean": torch.add, "sum": torch.add, "max": torch.maximum, "min": torch.minimum}


def _as_tensor(value, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=device)


class StepMetrics:
    """The metrics of one optimizer step, accumulated on ``device`` without host syncs.

    ``add(metrics)`` once per micro-batch, then ``reduce(units, world)`` once.
    """

    def __init__(self, device: torch.device):
        self.device = device
        # name -> (reduction, value, count or None)
        self._state: dict[str, tuple[str, torch.Tensor, torch.Tensor | None]] = {}

    def add(self, metrics: dict) -> None:
        """Fold one micro-batch's ``metrics`` (values as in the module doc) in."""
        for name, raw in metrics.items():
            metric = as_metric(raw)
            value = _as_tensor(metric.value, self.device)
            count = None if metric.count is None else _as_tensor(metric.count, self.device)
            if name not in self._state:
                self._state[name] = (metric.reduce, value, count)
                continue
            how, seen, seen_count = self._state[name]
            if how != metric.reduce or (seen_count is None) != (count is None):
                raise ValueError(f"metric {name!r} changed its reduction between micro-batches of a step")
            self._state[name] = (how, _COMBINE[how](seen, value), None if count is None else seen_count + count)

    def reduce(self, units: int, world=None, extra: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Every metric's value for the step, as Python floats, after one transfer to
        the host: means divided by their summed counts (or by ``units``), the rest as
        reduced. With a ``world`` of several ranks every rank must hold the same names;
        sums, maxima and minima are combined over the ranks first. ``extra``: 0-d
        tensors already global (a gradient norm) that ride along in the same transfer."""
        names = sorted(self._state)
        by_kind: dict[str, list[torch.Tensor]] = {"sum": [], "max": [], "min": []}
        slots = {}  # name -> (kind, index of value, index of count or None)
        for name in names:
            how, value, count = self._state[name]
            kind = how if how in ("max", "min") else "sum"
            slots[name] = (kind, len(by_kind[kind]), None if count is None else len(by_kind[kind]) + 1)
            by_kind[kind].append(value)
            if count is not None:
                by_kind[kind].append(count)
        reduced = {}
        for kind, values in by_kind.items():
            if values:
                stacked = torch.stack(values)
                if world is not None and world.size > 1:
                    op = {"sum": "SUM", "max": "MAX", "min": "MIN"}[kind]
                    torch.distributed.all_reduce(stacked, op=getattr(torch.distributed.ReduceOp, op))
                reduced[kind] = stacked
        extra = extra or {}
        pieces = [reduced[kind] for kind in ("sum", "max", "min") if kind in reduced]
        pieces += [_as_tensor(value, self.device).reshape(1) for value in extra.values()]
        host = torch.cat(pieces).tolist() if pieces else []  # the step's one device-to-host copy
        offsets, start = {}, 0
        for kind in ("sum", "max", "min"):
            if kind in reduced:
                offsets[kind] = start
                start += reduced[kind].numel()
        result = {}
        for name in names:
            kind, index, count_index = slots[name]
            value = host[offsets[kind] + index]
            if self._state[name][0] == "mean":
                value /= units if count_index is None else max(host[offsets[kind] + count_index], 1.0)
            result[name] = value
        for i, name in enumerate(extra):
            result[name] = host[start + i]
        return result
