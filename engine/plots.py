"""``metrics.png``: the curves a run's users watch, per algorithm.

Each algorithm has its panels (``PANELS``): a title and the ``metrics.jsonl`` names of
the series drawn in it (several series share a panel when they are read together, such
as the chosen and rejected log-probs). A panel is drawn only when the run logged one of
its series, so no panel is empty; held-out metrics (``eval/...``) that no panel names
get a panel of their own. The held-out curves run from the evaluation before training
to the final one: ``before`` and ``after`` (the algorithm's evaluations, by name without
``eval/``) are drawn at the session's first step (0, or a resumed run's checkpoint) and
at the last. The figure's title names the algorithm, the run folder, the steps and the
held-out change. The online algorithms' loss is not drawn: a policy-gradient
surrogate's value says nothing of progress (GRPO's is zero on average by construction);
their reward and held-out accuracy do.

Without a known algorithm the panels are ``loss``, ``lr``, ``grad_norm`` and each
``eval/`` metric, one per name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .config import ALGORITHMS
from .loop import METRICS_FILE, METRICS_PLOT

__all__ = [
    "PANELS", "Panel", "algorithm_of", "metrics_figure", "plotted_panels", "write_metrics_plot", "write_run_plot",
]


@dataclass(frozen=True)
class Panel:
    """One subplot: ``title``, the names of the series it draws, in order, and for a
    share (an accuracy) the whole range 0 to 1 on the y axis, so its scale does not
    exaggerate a change of a few points."""

    title: str
    series: tuple[str, ...]
    share: bool = False


_HELDOUT = (
    Panel("held-out accuracy (greedy exact match)", ("eval/heldout_accuracy",), share=True),
    Panel("held-out reward (greedy)", ("eval/heldout_reward",)),
)
_REWARD = Panel("reward (rollout mean)", ("reward",))
_POLICY_CHANGE = "KL(old || new): the policy's change per step"
_ROLLOUT = (
    Panel("entropy (token mean)", ("entropy_mean",)),
    Panel("completion length (tokens)", ("completion_length",)),
)
_PREFERENCE_ACCURACY = Panel("preference accuracy", ("reward_accuracy", "eval/preference_accuracy"), share=True)
_MARGIN = Panel("reward margin (chosen - rejected)", ("reward_margin",))
_LOGPROBS = Panel("sequence log-probs", ("chosen_logprob", "rejected_logprob"))
_PAIRS = (
    _PREFERENCE_ACCURACY,
    _MARGIN,
    _LOGPROBS,
    Panel("implicit rewards beta*(lp - lp_ref)", ("chosen_reward", "rejected_reward")),
    Panel("loss", ("loss",)),
    *_HELDOUT,
)
PANELS: dict[str, tuple[Panel, ...]] = {
    "sft": (Panel("loss (NLL per completion token)", ("loss",)), *_HELDOUT),
    "reward": (Panel("loss", ("loss",)), _PREFERENCE_ACCURACY, _MARGIN),
    "dpo": _PAIRS,
    "ipo": _PAIRS,
    "kto": (
        Panel("preference accuracy", ("eval/preference_accuracy",), share=True),
        Panel("reward of desirable minus undesirable", ("signed_reward",)),
        Panel("KL estimate z0", ("z0",)),
        _LOGPROBS,
        Panel("loss", ("loss",)),
        *_HELDOUT,
    ),
    "grpo": (
        _REWARD,
        *_HELDOUT,
        Panel("KL to the reference", ("ref_kl",)),
        Panel("clip fraction", ("clip_frac_low", "clip_frac_high", "dual_clip_frac")),
        Panel(_POLICY_CHANGE, ("approx_kl",)),
        *_ROLLOUT,
    ),
    "ppo": (
        _REWARD,
        *_HELDOUT,
        Panel("KL to the reference (per completion)", ("kl",)),
        Panel("clip fraction", ("clip_frac_low", "clip_frac_high", "value_clip_frac")),
        Panel("value loss", ("value_loss",)),
        Panel(_POLICY_CHANGE, ("approx_kl",)),
        Panel("pretraining loss (ptx)", ("ptx_loss",)),
        *_ROLLOUT,
    ),
    "trpo": (
        _REWARD,
        *_HELDOUT,
        Panel(_POLICY_CHANGE, ("kl",)),
        Panel("surrogate improvement", ("surrogate_improvement",)),
        Panel("line search", ("accepted", "backtracks")),
        *_ROLLOUT,
    ),
}
_GENERIC = ("loss", "lr", "grad_norm")


def _has(records: list[dict], name: str) -> bool:
    return any(_finite(r.get(name)) for r in records)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plotted_panels(records: list[dict], algorithm: str | None = None) -> list[Panel]:
    """The panels ``metrics_figure`` draws for ``records`` (metrics.jsonl's, with any
    before/after points already in them), each with the series it has data for."""
    evals = sorted({name for r in records for name in r if name.startswith("eval/") and _finite(r[name])})
    if algorithm not in PANELS:
        return [Panel(name, (name,)) for name in (*_GENERIC, *evals) if _has(records, name)]
    panels = []
    for panel in PANELS[algorithm]:
        present = tuple(name for name in panel.series if _has(records, name))
        if present:
            panels.append(Panel(panel.title, present, panel.share))
    named = {name for panel in panels for name in panel.series}
    return panels + [Panel(name, (name,)) for name in evals if name not in named]


def _with_evaluations(records: list[dict], before: dict | None, after: dict | None, start_step: int) -> list[dict]:
    """``records`` with ``before`` as a record at ``start_step`` and ``after`` at the
    last step."""
    records = list(records)
    if before:
        records.insert(0, {"step": start_step, **{f"eval/{k}": v for k, v in before.items()}})
    if after:
        last = max((r["step"] for r in records), default=start_step)
        records.append({"step": last, **{f"eval/{k}": v for k, v in after.items()}})
    return records


def _title(algorithm: str | None, run_dir: str | None, records: list[dict], before: dict | None,
           after: dict | None) -> str:
    steps = max((r["step"] for r in records), default=0)
    changes = [f"{name} {before[name]:.3g} -> {after[name]:.3g}" for name in (before or {})
               if _finite(before[name]) and _finite((after or {}).get(name))]
    return " | ".join(filter(None, [algorithm, run_dir, f"{steps} steps", *changes]))


def metrics_figure(records: list[dict], *, algorithm: str | None = None, run_dir: str | None = None,
                   before: dict | None = None, after: dict | None = None, start_step: int = 0):
    """A matplotlib ``Figure`` of ``records`` (metrics.jsonl's) against the step: the
    panels of ``algorithm`` (see the module's doc; each line labelled by its metric's
    name), titled by the algorithm, ``run_dir``, the steps and the held-out metrics'
    change. ``before``/``after``: the evaluations before and after training
    (``{"heldout_accuracy": 0.41}``), drawn at ``start_step`` (a resumed run's
    checkpoint, else 0) and at the last step."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    records = _with_evaluations(records, before, after, start_step)
    panels = plotted_panels(records, algorithm)
    columns = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    titled = algorithm is not None or run_dir is not None
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows + (0.4 if titled else 0)), layout="constrained")
    if titled:
        figure.suptitle(_title(algorithm, run_dir, records, before, after))
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for name in panel.series:
            points = [(r["step"], r[name]) for r in records if _finite(r.get(name))]
            steps, values = zip(*points)
            # Markers: evaluations are few points, and a lone point has no line to show it.
            axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=name)
        if len(panel.series) > 1:
            axes.legend(fontsize="small")
        if panel.share:
            axes.set_ylim(-0.03, 1.03)
        axes.set_title(panel.title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    return figure


def write_metrics_plot(metrics_path: Path, png_path: Path, *, algorithm: str | None = None,
                       before: dict | None = None, after: dict | None = None, start_step: int = 0) -> None:
    """Write ``metrics_figure`` of the records of ``metrics_path`` as a PNG, titled with
    ``algorithm`` and the run folder (``png_path``'s)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    figure = metrics_figure(records, algorithm=algorithm, run_dir=str(Path(png_path).parent), before=before,
                            after=after, start_step=start_step)
    FigureCanvasAgg(figure)
    figure.savefig(png_path, dpi=100)


def algorithm_of(config) -> str | None:
    """The algorithm whose config class ``config`` is (None for another class)."""
    return next((name for name, cls in ALGORITHMS.items() if type(config) is cls), None)


def write_run_plot(run_dir: str | Path, config, *, before: dict, after: dict | None, start_step: int = 0) -> None:
    """``run_dir/metrics.png`` of a run of ``config``'s algorithm that completed, from its
    ``metrics.jsonl`` and its evaluations before and after training."""
    run_dir = Path(run_dir)
    write_metrics_plot(run_dir / METRICS_FILE, run_dir / METRICS_PLOT, algorithm=algorithm_of(config),
                       before=before, after=after, start_step=start_step)
