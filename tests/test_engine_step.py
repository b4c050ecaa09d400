"""One optimizer step of the shared loop: metrics declared per micro-batch and reduced once
(means, maxima, minima, sums; over the ranks under torchrun), no host sync while the
micro-batches run, and the update hook an algorithm may put in place of AdamW."""

import collections
import json
import os
import subprocess
import sys

import pytest
import torch

from fastpo.engine.algorithms._online import policy_loss_metrics
from fastpo.engine.config import SFTConfig
from fastpo.engine.distributed import World
from fastpo.engine.loop import STATE_FILE, AdamWUpdate, StepOutcome, Update, backpropagate, train_loop
from fastpo.engine.step_metrics import Metric, StepMetrics, maximum, mean, minimum, total
from fastpo.kernels import policy_loss


def _micro_batches(sizes=(3, 7, 1), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(n, 5, generator=generator), "y": torch.randn(n, 1, generator=generator), "num_units": n}
            for n in sizes]


def _loss_fn(model, batch):
    """A squared error, with one metric of every reduction."""
    error = model(batch["x"]) - batch["y"]
    sq = error.detach() ** 2
    return (error**2).sum(), {
        "sq": sq.sum(),  # a mean over the units
        "first": (batch["x"][:, 0].sum(), len(batch["x"])),  # a mean over its own count
        "largest": maximum(sq.max()),
        "smallest": minimum(sq.min()),
        "rows": total(torch.tensor(float(len(batch["x"])))),
        "half": mean(sq.sum() / 2),
    }


def test_each_metric_reduces_as_it_declares():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    group = _micro_batches()
    metrics, units = backpropagate(model, _loss_fn, group)
    values = metrics.reduce(units)
    # Independent reference: every row of the step at once, in float64.
    x = torch.cat([b["x"] for b in group]).double()
    y = torch.cat([b["y"] for b in group]).double()
    sq = (x @ model.weight.detach().double().T + model.bias.detach().double() - y) ** 2
    assert units == 11
    assert values["loss"] == pytest.approx(float(sq.mean()), rel=1e-6)
    assert values["sq"] == pytest.approx(float(sq.mean()), rel=1e-6)
    assert values["half"] == pytest.approx(float(sq.mean()) / 2, rel=1e-6)
    assert values["first"] == pytest.approx(float(x[:, 0].mean()), rel=1e-6)
    assert values["largest"] == pytest.approx(float(sq.max()), rel=1e-6)
    assert values["smallest"] == pytest.approx(float(sq.min()), rel=1e-6)
    assert values["rows"] == 11.0


def test_a_metric_keeps_its_reduction():
    metrics = StepMetrics(torch.device("cpu"))
    metrics.add({"m": maximum(torch.tensor(1.0))})
    with pytest.raises(ValueError, match="metric 'm' changed its reduction"):
        metrics.add({"m": torch.tensor(2.0)})
    with pytest.raises(ValueError, match="a count applies to reduce='mean' only"):
        Metric(torch.tensor(1.0), 2, "sum")


def test_ratio_max_is_the_steps_maximum():
    """policy_loss's ratio_max over two micro-batches: the larger maximum, where the old
    token-weighted mean of the micro-batch maxima lay in between."""
    torch.manual_seed(0)
    metrics = StepMetrics(torch.device("cpu"))
    ratios, means = [], []
    for shift, tokens in ((0.0, 6), (0.5, 2)):
        old = torch.zeros(2, tokens // 2)
        logprobs = torch.full_like(old, shift) + 0.1 * torch.randn_like(old)
        mask = torch.ones_like(old, dtype=torch.bool)
        _, stats = policy_loss(logprobs, old, torch.ones(2), mask, backend="torch")
        metrics.add(policy_loss_metrics(stats, mask.sum()))
        ratios.append(torch.exp(logprobs - old).flatten())
        means.append(stats["ratio_max"] * tokens)
    values = metrics.reduce(units=8)
    everything = torch.cat(ratios)
    assert values["ratio_max"] == pytest.approx(float(everything.max()), rel=1e-6)
    assert values["ratio_mean"] == pytest.approx(float(everything.mean()), rel=1e-6)
    assert float(sum(means) / 8) < values["ratio_max"]  # what was logged before


_SYNCS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


def _count_syncs(monkeypatch):
    """Count the calls of every Tensor method that copies a value to the host."""
    counts = collections.Counter()
    for name in _SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_a_step_copies_to_the_host_once(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    config = SFTConfig(max_grad_norm=0.5)
    update = AdamWUpdate(model=model, params=list(model.parameters()), config=config, world=World())
    group = _micro_batches()
    counts = _count_syncs(monkeypatch)
    metrics, units = backpropagate(model, _loss_fn, group)
    assert sum(counts.values()) == 0  # none while the micro-batches run
    metrics.reduce(units)
    assert counts == {"tolist": 1}  # every value of the step in one copy
    monkeypatch.undo()
    # The whole AdamW step: the same one copy (the gradient norm rides along), then the step.
    counts = _count_syncs(monkeypatch)
    before = model.weight.detach().clone()
    outcome = update.step(model, _loss_fn, group, world=update.world, autocast=None)
    syncs = dict(counts)
    monkeypatch.undo()
    assert syncs.get("tolist") == 1 and not {"__float__", "__bool__", "numpy"} & syncs.keys()
    assert outcome.skipped is None and not torch.equal(model.weight, before)
    assert {"lr", "loss", "grad_norm", "units", "sq", "largest"} <= outcome.record.keys()


# Under torchrun: rank 0 holds the values 1 and 4 over 2 units, rank 1 the values 3
# and -2 over 6 units; each rank writes what the step reduces them to.
REDUCE_WORKER = """
import json, sys
import torch
from fastpo.engine.distributed import world
from fastpo.engine.step_metrics import StepMetrics, maximum, minimum, total

current = world(torch.device("cpu"))
metrics = StepMetrics(current.device)
for value in ((1.0, 4.0), (3.0, -2.0))[current.rank]:
    v = torch.tensor(value)
    metrics.add({"mean": v, "pair": (v, 1), "max": maximum(v), "min": minimum(v), "sum": total(v)})
values = metrics.reduce(units=8, world=current, extra={"norm": torch.tensor(2.5)})
with open(f"{sys.argv[1]}.{current.rank}", "w") as f:
    json.dump(values, f)
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_sums_maxima_and_minima_combine_over_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(REDUCE_WORKER)
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(tmp_path / "values")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    want = {"mean": 6.0 / 8, "pair": 6.0 / 4, "max": 4.0, "min": -2.0, "sum": 6.0, "norm": 2.5}
    for rank in (0, 1):
        got = json.loads((tmp_path / f"values.{rank}").read_text())
        assert got == pytest.approx(want), rank


class _SignSGD(Update):
    """A replacement step: ``w -= lr * sign(grad)``, counting its steps in its state."""

    def __init__(self, *, model, params, config, world):
        self.params, self.lr, self.steps = params, config.learning_rate, 0

    def step(self, model, loss_fn, micro_batches, *, world, autocast):
        for p in self.params:
            p.grad = None
        metrics, units = backpropagate(model, loss_fn, micro_batches, world=world)
        with torch.no_grad():
            for p in self.params:
                p -= self.lr * p.grad.sign()
        self.steps += 1
        return StepOutcome({"signs_taken": self.steps, **metrics.reduce(units)})

    def state_dict(self):
        return {"sign_sgd_steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["sign_sgd_steps"]


def test_an_algorithm_replaces_the_update(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    start = [p.detach().clone() for p in model.parameters()]
    batch = _micro_batches(sizes=(4,))[0]
    config = SFTConfig(steps=3, learning_rate=0.01, log_every=1, save_every=2)

    def run(config):
        return train_loop(model=model, tokenizer=None, config=config, loss_fn=_loss_fn,
                          batches=lambda position: iter(lambda: batch, None), run_dir=tmp_path, update=_SignSGD)

    model.save_pretrained = lambda folder, state_dict=None: _save(model, folder)
    run(config)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["signs_taken"] for r in records] == [1, 2, 3] and "grad_norm" not in records[0]
    # Three sign steps of 0.01 on every weight (no AdamW moment, no schedule).
    for moved, before in zip(model.parameters(), start):
        assert (moved.detach() - before).abs().allclose(torch.full_like(before, 0.03), atol=1e-6)
    state = torch.load(tmp_path / "checkpoints" / "step-00000003" / STATE_FILE, weights_only=False)
    assert state["sign_sgd_steps"] == 3 and "optimizer" not in state
    # Resume from step 2: the update's state comes back.
    os.remove(tmp_path / "checkpoints" / "step-00000003" / STATE_FILE)
    result = run(SFTConfig(steps=3, learning_rate=0.01, log_every=1, save_every=2, resume=True))
    assert result.start_step == 2
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["signs_taken"] == 3


def _save(model, folder):
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
