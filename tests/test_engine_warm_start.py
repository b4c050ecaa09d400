"""The warm start as a stage of its own, cached once per (model, data, settings, seed) for
every algorithm and folder; and what a resumed run reports (the checkpoint's evaluation,
a finished run that has nothing left to train, checkpoints of older versions)."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from fastpo.engine import train
from fastpo.engine.config import GRPOConfig
from fastpo.engine.loop import STATE_FILE
from fastpo.engine.task import AdditionTask
from fastpo.engine.warm_start import cache_root, settings

# A warm start of 5 SFT steps (its accuracy target, 90%, is out of reach: the step cap ends it).
WARM = {"warm_start_steps": 5, "warm_start_accuracy": 0.9}
GRPO = {"steps": 1, "batch_size": 8, "prompts_per_rollout": 2, "num_generations": 4, "grad_accum_steps": 1,
        "max_new_tokens": 4, "eval_every": 0}
DPO = {"steps": 1, "batch_size": 8, "eval_every": 0}


def _records(path):
    records = [json.loads(line) for line in open(path)]
    for record in records:
        record.pop("step_time_s")
    return records


def test_two_algorithms_reuse_one_cached_warm_start(tmp_path, capsys):
    grpo = train("grpo", {**GRPO, **WARM, "output_dir": str(tmp_path / "grpo")})
    assert "warm start: SFT on the built-in task" in capsys.readouterr().err
    dpo = train("dpo", {**DPO, **WARM, "output_dir": str(tmp_path / "dpo")})
    err = capsys.readouterr().err
    assert "warm start: reusing" in err and "warm start: SFT" not in err

    made, reused = grpo["warm_start"], dpo["warm_start"]
    assert made["folder"] == reused["folder"] and not made["reused"] and reused["reused"]
    # In the cache folder (the test's own: FASTPO_CACHE), not in either run folder.
    assert cache_root() == Path(os.environ["FASTPO_CACHE"]) and Path(made["folder"]).parent == cache_root() / "warm_start"
    assert made["steps"] == 5
    # The warm start's held-out accuracy is the runs' own evaluation of the same weights.
    assert grpo["heldout_accuracy_before"] == dpo["heldout_accuracy_before"] == made["heldout_accuracy"]
    # Each run folder links the entry it used.
    for run in ("grpo", "dpo"):
        assert (tmp_path / run / "warm_start").resolve() == Path(made["folder"])
    # Another seed is another warm start.
    other = train("dpo", {**DPO, **WARM, "seed": 1, "output_dir": str(tmp_path / "seed1")})
    assert "warm start: SFT on the built-in task" in capsys.readouterr().err
    assert other["warm_start"]["folder"] != made["folder"] and not other["warm_start"]["reused"]


def test_the_cache_key_follows_what_the_warm_start_depends_on(tmp_path, monkeypatch):
    base = settings(GRPOConfig(), 1500)
    assert settings(GRPOConfig(output_dir="elsewhere", steps=3, learning_rate=1.0), 1500) == base  # not its inputs
    for change in ({"seed": 1}, {"max_length": 32}, {"warm_start_accuracy": 0.5}, {"dtype": "bfloat16"}):
        assert settings(GRPOConfig(**change), 1500) != base, change
    assert settings(GRPOConfig(), 1000) != base
    # A checkpoint folder is itself and its files: rewritten in place, it is another model.
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    first = settings(GRPOConfig(model=str(folder), warm_start_steps=10), 10)
    (folder / "model.safetensors").write_bytes(b"weights")
    assert settings(GRPOConfig(model=str(folder), warm_start_steps=10), 10) != first
    # A built-in model whose definition changes (here its vocabulary) is another model.
    from fastpo.engine import tokenizer

    monkeypatch.setattr(tokenizer, "CHARACTERS", tokenizer.CHARACTERS + "#")
    assert settings(GRPOConfig(), 1500) != base


def _pairs(path, n=16):
    path.write_text("".join(json.dumps(row) + "\n" for row in AdditionTask(seed=5).preference_pairs(n)))
    return str(path)


def test_a_resumed_run_reports_the_accuracy_of_its_checkpoint(tmp_path):
    pairs = _pairs(tmp_path / "pairs.jsonl")
    run = {"data": pairs, "eval_data": pairs, "warm_start_steps": 0, "batch_size": 8, "learning_rate": 3e-3,
           "beta": 0.5, "warmup_steps": 0, "eval_every": 0, "log_every": 1, "output_dir": str(tmp_path / "run")}
    first = train("dpo", {**run, "steps": 3})
    assert first["preference_accuracy_before"] == 0.5  # the policy is its reference
    assert first["preference_accuracy_after"] != 0.5
    resumed = train("dpo", {**run, "steps": 4, "resume": True})
    assert resumed["resumed_from_step"] == 3 and resumed["status"] == "completed"
    # Before = the checkpoint this session started from, not the freshly built model.
    assert resumed["preference_accuracy_before"] == first["preference_accuracy_after"]
    assert resumed["heldout_accuracy_before"] == first["heldout_accuracy_after"]


def test_resuming_a_finished_run_says_that_nothing_is_left(tmp_path, capsys):
    run = {"steps": 2, "batch_size": 4, "log_every": 1, "eval_every": 0, "output_dir": str(tmp_path)}
    done = train("sft", run)
    records = _records(tmp_path / "metrics.jsonl")
    capsys.readouterr()
    for steps in (2, 1):
        again = train("sft", {**run, "steps": steps, "resume": True})
        err = capsys.readouterr().err
        assert again["status"] == "already_completed" and again["steps"] == 2 and again["resumed_from_step"] == 2
        assert f"already at step 2 and steps={steps}: nothing to train" in err
        assert again["heldout_accuracy_before"] == again["heldout_accuracy_after"] == done["heldout_accuracy_after"]
        assert _records(tmp_path / "metrics.jsonl") == records


@pytest.mark.parametrize("algorithm", ["trpo", "sft"])
def test_checkpoints_of_the_previous_version_resume(tmp_path, algorithm):
    """A checkpoint as the version before the update hook wrote it: trpo's with AdamW's
    (idle) optimizer and scheduler state and the AdamW options in its config.yaml, sft's
    in the same format as now. Each resumes to the uninterrupted run's log."""
    options = {"steps": 2, "save_every": 1, "log_every": 1, "eval_every": 0, "warm_start_steps": 0, "batch_size": 4}
    if algorithm == "trpo":
        options.update(prompts_per_rollout=2, num_generations=4, max_new_tokens=4,
                       rewards=["test_engine_trpo:digit_reward"])
    full = train(algorithm, {**options, "output_dir": str(tmp_path / "full")})
    shutil.copytree(tmp_path / "full", tmp_path / "old")
    shutil.rmtree(tmp_path / "old" / "checkpoints" / "step-00000002")
    if algorithm == "trpo":
        config_file = tmp_path / "old" / "config.yaml"
        old = yaml.safe_load(config_file.read_text())
        old.update(grad_accum_steps=1, learning_rate=0.001, weight_decay=0.0, warmup_steps=10, lr_schedule="cosine",
                   max_grad_norm=1.0, num_iterations=1)
        config_file.write_text(yaml.safe_dump(old))
        state_file = tmp_path / "old" / "checkpoints" / "step-00000001" / STATE_FILE
        state = torch.load(state_file, weights_only=False)
        parameter = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([parameter])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
        torch.save(state, state_file)
    resumed = train(algorithm, {**options, "output_dir": str(tmp_path / "old"), "resume": True})
    assert resumed["status"] == "completed" and resumed["resumed_from_step"] == 1
    assert _records(tmp_path / "old" / "metrics.jsonl") == _records(tmp_path / "full" / "metrics.jsonl")
    assert resumed["loss"] == full["loss"]
