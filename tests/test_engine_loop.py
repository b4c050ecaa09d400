"""The shared training loop: schedule, accumulation, resume, signals, NaN guard, checkpoints.

The loop is driven through the SFT algorithm on builtin:tiny, with its loss_fn wrapped
(the loop is patched inside the algorithm module) to inject signals and NaN losses.
"""

import json
import math
import os
import shutil
import signal

import pytest
import torch

from fastpo.engine import train
from fastpo.engine.algorithms import _common
from fastpo.engine.loop import (
    STATE_FILE,
    TrainingDiverged,
    accumulate_gradients,
    latest_checkpoint,
    learning_rate_factor,
    load_model_weights,
    train_loop,
)

SMALL_RUN = {"steps": 6, "batch_size": 4, "grad_accum_steps": 2, "warmup_steps": 2, "learning_rate": 3e-3,
             "log_every": 1, "eval_every": 2, "save_every": 2}


def _records(path):
    """metrics.jsonl without its wall-clock field."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record.pop("step_time_s")
    return records


def _wrap_loss(monkeypatch, wrapper):
    """Run an algorithm with ``wrapper(call_number, model, loss, metrics) -> (loss, metrics)``
    applied to every loss_fn call (numbered from 1): the shared loop is wrapped where the
    algorithms call it."""
    calls = {"n": 0}

    def patched_loop(**kwargs):
        inner = kwargs["loss_fn"]

        def loss_fn(model, batch):
            calls["n"] += 1
            return wrapper(calls["n"], model, *inner(model, batch))

        return train_loop(**{**kwargs, "loss_fn": loss_fn})

    monkeypatch.setattr(_common, "train_loop", patched_loop)


def test_learning_rate_schedule():
    kw = {"total_steps": 10, "warmup_steps": 3}
    # warmup (s + 1) / (warmup + 1): 1/4, 2/4, 3/4, then the peak
    assert [learning_rate_factor(s, schedule="cosine", **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # cosine over the 7 steps after warmup: step 3 + 3.5 is the half-way point, factor 1/2
    for s in range(3, 10):
        progress = (s - 3) / 7
        assert learning_rate_factor(s, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))
        assert learning_rate_factor(s, schedule="linear", **kw) == pytest.approx(1 - progress)
        assert learning_rate_factor(s, schedule="constant", **kw) == 1.0
    assert learning_rate_factor(9, schedule="cosine", **kw) > 0  # the last step still learns
    # wsd over 20 steps: warmup 3, peak through step 15, then the last 4 (20%) at 4/4 .. 1/4
    wsd = [learning_rate_factor(s, schedule="wsd", total_steps=20, warmup_steps=3) for s in range(20)]
    assert wsd == [0.25, 0.5, 0.75] + [1.0] * 13 + [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="got 'step'"):
        learning_rate_factor(5, schedule="step", **kw)


def test_accumulation_gives_the_gradient_of_one_large_batch():
    """Micro-batches of 3, 7 and 1 tokens: the accumulated gradient is that of the mean
    over all 11 tokens, not the mean of the three micro-batch means."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    sizes = [3, 7, 1]
    xs = [torch.randn(n, 5) for n in sizes]
    ys = [torch.randn(n, 1) for n in sizes]
    group = [{"x": x, "y": y, "num_units": len(x)} for x, y in zip(xs, ys)]

    def loss_fn(model, batch):
        sq = (model(batch["x"]) - batch["y"]) ** 2
        # "first": a per-row mean given as (sum, count), so its count is rows, not units.
        return sq.sum(), {"sq": sq.sum().detach(), "first": (batch["x"][:, 0].sum(), len(batch["x"]) / 2)}

    loss_sum, metrics, units = accumulate_gradients(model, loss_fn, group)
    accumulated = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    full = ((model(torch.cat(xs)) - torch.cat(ys)) ** 2).mean()
    full.backward()
    assert units == 11 and loss_sum / units == pytest.approx(full.item(), rel=1e-6)
    assert metrics["sq"] == pytest.approx(loss_sum / units, rel=1e-6)
    assert metrics["first"] == pytest.approx(torch.cat(xs)[:, 0].sum().item() / (units / 2), rel=1e-6)
    for got, want in zip(accumulated, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # The per-micro-batch mean (each weighted 1/3) differs: the test can tell them apart.
    model.zero_grad()
    sum(((model(x) - y) ** 2).mean() / 3 for x, y in zip(xs, ys)).backward()
    assert not torch.allclose(model.weight.grad, accumulated[0], rtol=1e-3)


def test_resume_after_a_signal_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    full = train("sft", {**SMALL_RUN, "output_dir": str(tmp_path / "full")})
    assert full["status"] == "completed" and full["steps"] == 6

    # SIGTERM arrives during step 3 (the loss calls 5 and 6): the loop finishes the step,
    # writes a checkpoint and stops.
    def interrupt(call, model, loss, metrics):
        if call == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss, metrics

    _wrap_loss(monkeypatch, interrupt)
    run_dir = tmp_path / "interrupted"
    stopped = train("sft", {**SMALL_RUN, "output_dir": str(run_dir)})
    assert stopped["status"] == "interrupted" and stopped["steps"] == 3
    assert "heldout_accuracy_after" not in stopped
    assert stopped["checkpoint"].endswith("step-00000003")
    assert [r["step"] for r in _records(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored

    monkeypatch.undo()
    resumed = train("sft", {**SMALL_RUN, "output_dir": str(run_dir), "resume": True})
    assert resumed["status"] == "completed"
    assert _records(run_dir / "metrics.jsonl") == _records(tmp_path / "full" / "metrics.jsonl")
    for key in ("loss", "heldout_accuracy_before", "heldout_accuracy_after"):
        assert resumed[key] == full[key], key
    assert [r["step"] for r in _records(run_dir / "metrics.jsonl") if "eval/heldout_accuracy" in r] == [2, 4]
    # one JSON summary line per run on stdout
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["status"] for line in lines] == ["completed", "interrupted", "completed"]


def test_resume_truncates_records_logged_after_the_checkpoint(tmp_path):
    run = {**SMALL_RUN, "steps": 4, "output_dir": str(tmp_path)}
    train("sft", run)
    # As if the run had died after logging step 4 but before its checkpoint landed.
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")
    before = _records(tmp_path / "metrics.jsonl")
    train("sft", {**run, "resume": True})
    assert _records(tmp_path / "metrics.jsonl") == before
    # Resuming a finished run trains nothing and reports its last logged loss.
    again = train("sft", {**run, "resume": True})
    assert again["steps"] == 4 and again["loss"] == before[-1]["loss"]
    assert _records(tmp_path / "metrics.jsonl") == before


def test_evaluations_are_logged_between_log_steps(tmp_path):
    summary = train("sft", {**SMALL_RUN, "steps": 5, "log_every": 4, "eval_every": 3, "output_dir": str(tmp_path)})
    records = _records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 4, 5]  # eval at 3, log at 4, the last step
    assert "eval/heldout_accuracy" in records[0] and "eval/heldout_accuracy" not in records[1]
    assert summary["loss"] == records[-1]["loss"]


def test_checkpoint_contents(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = train("sft", {**SMALL_RUN, "steps": 4, "output_dir": str(tmp_path)})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000004"]
    checkpoint = latest_checkpoint(tmp_path)
    assert str(checkpoint) == summary["checkpoint"]
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    assert state["step"] == 4 and state["data_position"] == 4 * SMALL_RUN["grad_accum_steps"]
    assert len(state["rng"]) == 1 and set(state["rng"][0]) >= {"torch", "python", "numpy"}  # one entry per rank
    assert state["scheduler"]["last_epoch"] == 4
    assert len(state["optimizer"]["state"]) == len(list(
        AutoModelForCausalLM.from_pretrained(checkpoint / "model").parameters()))

    model = AutoModelForCausalLM.from_pretrained(checkpoint / "model", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "model", local_files_only=True)
    assert tokenizer.encode("12+34=") == [tokenizer.convert_tokens_to_ids(c) for c in "12+34="]
    earlier = AutoModelForCausalLM.from_pretrained(checkpoint.with_name("step-00000002") / "model")
    assert not torch.equal(model.lm_head.weight, earlier.lm_head.weight)  # training moved the weights
    load_model_weights(earlier, checkpoint / "model")
    for (name, a), b in zip(model.state_dict().items(), earlier.state_dict().values()):
        assert torch.equal(a, b), name


def test_one_nan_loss_skips_the_step(tmp_path, monkeypatch):
    weights = {}

    def nan_in_step_3(call, model, loss, metrics):
        step = (call + 1) // 2  # two micro-batches per step
        if step == 3:
            weights.setdefault("at_3", {k: v.detach().clone() for k, v in model.state_dict().items()})
            return loss * float("nan"), metrics
        if step == 4 and "at_4" not in weights:
            weights["at_4"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return loss, metrics

    _wrap_loss(monkeypatch, nan_in_step_3)
    summary = train("sft", {**SMALL_RUN, "output_dir": str(tmp_path)})
    assert summary["status"] == "completed" and summary["steps"] == 6 and summary["skipped_steps"] == 1
    records = {r["step"]: r for r in _records(tmp_path / "metrics.jsonl")}
    assert records[3]["skipped"] == "non-finite loss" and records[3]["loss"] is None
    assert all("skipped" not in records[s] for s in (1, 2, 4, 5, 6))
    for name, value in weights["at_3"].items():  # the skipped step left the weights alone
        assert torch.equal(value, weights["at_4"][name]), name


def test_nan_losses_in_a_row_stop_the_run_with_the_checkpoint_intact(tmp_path, monkeypatch):
    seen = {}

    def nan_from_step_3(call, model, loss, metrics):
        seen["model"] = model
        return (loss * float("nan") if call > 4 else loss), metrics

    _wrap_loss(monkeypatch, nan_from_step_3)
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row \(up to step 5\).*step-00000002"):
        train("sft", {**SMALL_RUN, "steps": 10, "max_bad_steps": 3, "output_dir": str(tmp_path)})
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002"]  # step 4 was skipped: no checkpoint replaced the good one
    records = _records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r.get("skipped") for r in records] == [None, None] + ["non-finite loss"] * 3
    # The model in memory is still the step-2 model, equal to the checkpoint.
    saved = type(seen["model"]).from_pretrained(tmp_path / "checkpoints" / "step-00000002" / "model")
    for (name, a), b in zip(seen["model"].state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name
