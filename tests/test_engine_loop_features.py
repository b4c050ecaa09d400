"""The shared loop's precision, gradient checkpointing, TensorBoard events, metrics plot
and resume-consistency check, on builtin:tiny (sft) with a two-row held-out file."""

import json
import os
import signal
import struct
import sys

import pytest
import torch

from fastpo.engine import ConfigError, train
from fastpo.engine import loop as loop_module
from fastpo.engine.algorithms import _common
from fastpo.engine.config import SFTConfig
from fastpo.engine.forward import IGNORE_INDEX, encode_responses, response_logprobs
from fastpo.engine.loop import METRICS_PLOT, autocast_dtype, train_loop
from fastpo.engine.plots import metrics_figure
from fastpo.engine.models import load_causal_lm

RUN = {"steps": 4, "batch_size": 4, "grad_accum_steps": 1, "warmup_steps": 1, "learning_rate": 3e-3,
       "log_every": 1, "eval_every": 2, "save_every": 2, "warm_start_steps": 0}


@pytest.fixture
def run(tmp_path):
    """``run(out, **options)``: an sft run into ``tmp_path/out`` with a two-row held-out
    file (the evaluations stay cheap); returns the summary."""
    eval_file = tmp_path / "heldout.jsonl"
    eval_file.write_text('{"prompt": "12+34=", "completion": "46"}\n{"prompt": "1+2=", "completion": "3"}\n')

    def train_sft(out, **options):
        return train("sft", {**RUN, "eval_data": str(eval_file), "output_dir": str(tmp_path / out), **options})

    return train_sft


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _patch_loop(monkeypatch, before=None, each_loss=None):
    """Wrap the shared loop where the algorithms call it: ``before(model)`` runs when it
    starts (its return value, if callable, when it ends) and ``each_loss(call, model)``
    after each ``loss_fn`` call (numbered from 1)."""
    calls = {"n": 0}

    def patched_loop(**kwargs):
        inner = kwargs["loss_fn"]

        def loss_fn(model, batch):
            result = inner(model, batch)
            calls["n"] += 1
            if each_loss is not None:
                each_loss(calls["n"], model)
            return result

        after = before(kwargs["model"]) if before is not None else None
        try:
            return train_loop(**{**kwargs, "loss_fn": loss_fn})
        finally:
            if callable(after):
                after()

    monkeypatch.setattr(_common, "train_loop", patched_loop)


# ---------------------------------------------------------------- precision


def test_autocast_auto_is_bf16_on_cuda_only_and_over_float32_parameters():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype(SFTConfig(), cuda) == torch.bfloat16
    assert autocast_dtype(SFTConfig(), cpu) is None
    assert autocast_dtype(SFTConfig(dtype="float32"), cuda) == torch.bfloat16
    assert autocast_dtype(SFTConfig(dtype="bfloat16"), cuda) is None  # already low precision
    assert autocast_dtype(SFTConfig(autocast="none"), cuda) is None
    assert autocast_dtype(SFTConfig(autocast="bfloat16"), cpu) == torch.bfloat16


@pytest.mark.parametrize("options, message", [
    ({"autocast": "float16"}, r"option 'autocast': got 'float16', which needs loss scaling"),
    ({"autocast": "bfloat16", "dtype": "float16"}, r"option 'autocast': got 'bfloat16' with dtype=float16"),
])
def test_unsupported_autocast_is_refused_before_training(run, tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        run("refused", **options)
    assert not (tmp_path / "refused" / "config.yaml").exists()


def test_bf16_autocast_on_the_cpu_runs_the_matmuls_in_bf16_and_trains(run, tmp_path, monkeypatch):
    seen = []

    def hook_a_projection(model):
        handle = model.model.layers[0].mlp.down_proj.register_forward_hook(
            lambda module, args, output: seen.append(output.dtype))
        return handle.remove

    _patch_loop(monkeypatch, before=hook_a_projection)
    bf16 = run("bf16", autocast="bfloat16", eval_every=0)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    fp32 = run("fp32", autocast="none", eval_every=0)
    assert seen and set(seen) == {torch.float32}

    low = [r["loss"] for r in _records(tmp_path / "bf16" / "metrics.jsonl")]
    full = [r["loss"] for r in _records(tmp_path / "fp32" / "metrics.jsonl")]
    assert low[-1] < 0.8 * low[0]  # it trains
    assert low[0] != full[0] and low[0] == pytest.approx(full[0], rel=2e-2)  # bf16 rounding, same model
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=5e-2)
    saved = torch.load(tmp_path / "bf16" / "checkpoints" / "step-00000004" / "trainer_state.pt", weights_only=False)
    assert saved["optimizer"]["state"]["lm_head.weight"]["exp_avg"].dtype == torch.float32  # fp32 master weights


# ---------------------------------------------------------------- gradient checkpointing


def _one_step_gradients(tmp_path, name, checkpointing):
    """The gradients of one unclipped sft step on fixed rows, and how often layer 0's
    attention started (a pre-hook: the recomputation stops once it has what the backward
    needs, before the layer's last modules return)."""
    model, tokenizer = load_causal_lm("builtin:tiny", seed=3)
    batch = encode_responses(tokenizer, ["12+34=", "7+8=", "99+1="], ["46", "15", "100"], max_length=64)
    batch["num_units"] = int((batch["labels"] != IGNORE_INDEX).sum())
    calls = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda *args: calls.append(1))

    def loss_fn(model, batch):
        return -response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).sum(), {}

    config = SFTConfig(steps=1, max_grad_norm=None, warmup_steps=0, gradient_checkpointing=checkpointing)
    train_loop(model=model, tokenizer=tokenizer, config=config, loss_fn=loss_fn,
               batches=lambda position: iter(lambda: batch, None), run_dir=tmp_path / name)
    return {n: p.grad for n, p in model.named_parameters()}, len(calls)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    plain, plain_calls = _one_step_gradients(tmp_path, "plain", False)
    recomputed, recomputed_calls = _one_step_gradients(tmp_path, "checkpointed", True)
    assert (plain_calls, recomputed_calls) == (1, 2)  # the backward ran layer 0 again
    assert plain.keys() == recomputed.keys()
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_needs_a_model_that_has_it(tmp_path):
    model = torch.nn.Linear(3, 1)
    config = SFTConfig(steps=1, gradient_checkpointing=True)
    with pytest.raises(ConfigError, match=r"option 'gradient_checkpointing': got true, but Linear does not support"):
        train_loop(model=model, tokenizer=None, config=config, loss_fn=None, batches=None, run_dir=tmp_path)


# ---------------------------------------------------------------- TensorBoard


def test_without_tensorboard_one_note_and_no_events(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setattr(loop_module, "_tensorboard_note_shown", False)
    for _ in range(2):
        board = loop_module._TensorBoard(tmp_path, step=0)
        board.write({"step": 1, "loss": 1.0})
        board.close()
    assert capsys.readouterr().err.count("tensorboard is not installed") == 1
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_events_hold_the_logged_metrics_and_resume_purges(run, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run("board")
    folder = tmp_path / "board"
    # As if the run had died after logging step 4 but before its checkpoint landed: the
    # resumed run writes steps 3 and 4 again, and the events must hold them once.
    (folder / "checkpoints" / "step-00000004" / "trainer_state.pt").unlink()
    run("board", resume=True)
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    records = _records(folder / "metrics.jsonl")
    for name in ("loss", "lr", "grad_norm", "units", "eval/heldout_accuracy"):
        logged = [(r["step"], r[name]) for r in records if name in r]
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in logged], name
        assert [v for _, v in got] == pytest.approx([v for _, v in logged], rel=1e-6), name


# ---------------------------------------------------------------- the plot


def test_metrics_figure_has_one_panel_per_curve_with_the_logged_values():
    records = [
        {"step": 1, "loss": 3.0, "lr": 0.1, "grad_norm": 2.0, "units": 9},
        {"step": 2, "loss": None, "lr": 0.2, "grad_norm": None, "skipped": "non-finite loss"},
        {"step": 3, "loss": 2.0, "lr": 0.3, "grad_norm": 1.5, "eval/b": 0.5, "eval/a": 7.0},
        {"step": 4, "loss": 1.0, "lr": 0.2, "grad_norm": 1.0, "eval/a": 8.0},
    ]
    panels = {axes.get_title(): axes for axes in metrics_figure(records).axes}
    assert list(panels) == ["loss", "lr", "grad_norm", "eval/a", "eval/b"]
    want = {
        "loss": ([1, 3, 4], [3.0, 2.0, 1.0]),
        "lr": ([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.2]),
        "grad_norm": ([1, 3, 4], [2.0, 1.5, 1.0]),
        "eval/a": ([3, 4], [7.0, 8.0]),
        "eval/b": ([3], [0.5]),
    }
    for name, (steps, values) in want.items():
        (line,) = panels[name].get_lines()
        assert list(line.get_xdata()) == steps and list(line.get_ydata()) == values, name
        assert panels[name].get_xlabel() == "step"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    assert (length, kind) == (13, b"IHDR")
    return width, height


def test_metrics_plot_is_written_when_a_run_completes_only(run, tmp_path, monkeypatch):
    plot = tmp_path / "plotted" / METRICS_PLOT

    def interrupt(call, model):
        assert not plot.exists()  # nothing is plotted while the run trains
        if call == 2:  # during step 2
            os.kill(os.getpid(), signal.SIGTERM)

    _patch_loop(monkeypatch, each_loss=interrupt)
    assert run("plotted")["status"] == "interrupted"
    assert not plot.exists()
    monkeypatch.undo()
    assert run("plotted", resume=True)["status"] == "completed"
    # sft's loss and held-out accuracy: 2 panels of 4.5 x 3.2 inches under a 0.4-inch title, at 100 dpi
    assert _png_size(plot) == (900, 360)


# ---------------------------------------------------------------- resume consistency


def test_resume_refuses_a_config_that_changes_the_math(run, tmp_path):
    run("consistent", steps=2)
    config_file = tmp_path / "consistent" / "config.yaml"
    written = config_file.read_text()
    with pytest.raises(ConfigError) as refused:
        run("consistent", steps=4, resume=True, learning_rate=1e-3, batch_size=2)
    message = str(refused.value)
    assert "option 'learning_rate': 0.003 in" in message and "0.001 now" in message
    assert "option 'batch_size': 4 in" in message and "2 now" in message
    assert "option 'steps'" not in message
    assert config_file.read_text() == written  # the refused run overwrote nothing

    # steps, log_every, eval_every and save_every may change: the run goes on from step 2.
    resumed = run("consistent", steps=4, resume=True, log_every=2, eval_every=0, save_every=0)
    assert resumed["status"] == "completed" and resumed["steps"] == 4
    assert [r["step"] for r in _records(tmp_path / "consistent" / "metrics.jsonl")] == [1, 2, 4]


def test_resume_without_a_checkpoint_does_not_compare(run, tmp_path):
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.yaml").write_text("learning_rate: 1.0\n")  # no checkpoint beside it
    assert run("fresh", resume=True, steps=1)["status"] == "completed"
