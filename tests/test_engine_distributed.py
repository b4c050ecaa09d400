"""The shared loop under ``torchrun --nproc-per-node 2`` on the CPU (gloo, FSDP2): the
same config trains the same model as one process, checkpoints are plain Hugging Face
folders, and resume works under two processes and across process counts."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastpo.engine import train

# device=cpu: two gloo processes on the CPU, also on a machine with one GPU.
RUN = {"steps": 4, "batch_size": 4, "grad_accum_steps": 2, "warmup_steps": 1, "learning_rate": 3e-3,
       "log_every": 1, "eval_every": 2, "save_every": 2, "warm_start_steps": 0, "device": "cpu"}

# Run under torchrun: train, then (as if the run had died before its step-4 checkpoint
# landed) resume with two processes, then try a grad_accum_steps two ranks cannot share.
WORKER = """
import json, shutil, sys
from pathlib import Path
import torch.distributed as dist
from fastpo.engine import ConfigError, shutdown_distributed, train

config = json.loads(sys.argv[1])
run_dir = Path(config["output_dir"])
train("sft", config)
if dist.get_rank() == 0:
    shutil.copy(run_dir / "metrics.jsonl", run_dir / "first.jsonl")
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
dist.barrier()
train("sft", {**config, "resume": True})
try:
    train("sft", {**config, "grad_accum_steps": 3, "output_dir": str(run_dir / "odd")})
except ConfigError as error:  # raised on every rank, before any training
    if dist.get_rank() == 0:
        (run_dir / "refused.txt").write_text(str(error))
shutdown_distributed()
"""


def _records(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record.pop("step_time_s")
    return records


def _assert_same_records(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), a["step"]
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def _weights(run_dir, step=4):
    return load_file(run_dir / "checkpoints" / f"step-{step:08d}" / "model" / "model.safetensors")


def _assert_same_weights(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def _run_two_processes(worker: str, config: dict, tmp_path) -> None:
    """``worker`` (a script taking the JSON config) under ``torchrun --nproc-per-node 2``."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), json.dumps(config)],
        capture_output=True, text=True, timeout=300,
        # the tests folder on the path: workers import online_rewards
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)},
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-5000:]


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume(tmp_path):
    from transformers import AutoModelForCausalLM

    eval_file = tmp_path / "heldout.jsonl"
    eval_file.write_text('{"prompt": "12+34=", "completion": "46"}\n{"prompt": "1+2=", "completion": "3"}\n')
    config = {**RUN, "eval_data": str(eval_file)}
    two = tmp_path / "two"
    _run_two_processes(WORKER, {**config, "output_dir": str(two)}, tmp_path)

    one = tmp_path / "one"
    train("sft", {**config, "output_dir": str(one)})
    want = _records(one / "metrics.jsonl")
    assert [r["step"] for r in want] == [1, 2, 3, 4] and "eval/heldout_accuracy" in want[1]

    # Same per-step loss, gradient norm, units and evaluation; rank 0 alone wrote the log.
    _assert_same_records(_records(two / "first.jsonl"), want)
    _assert_same_weights(_weights(two), _weights(one))
    # The resumed two-process run continued from step 2 to the same end.
    _assert_same_records(_records(two / "metrics.jsonl"), want)
    _assert_same_weights(_weights(two), _weights(one))
    assert (two / "metrics.png").is_file()
    refused = (two / "refused.txt").read_text()
    assert refused.startswith("option 'grad_accum_steps': got 3, which 2 processes cannot share")

    # The checkpoint is a normal Hugging Face folder ...
    model = AutoModelForCausalLM.from_pretrained(two / "checkpoints" / "step-00000004" / "model")
    torch.testing.assert_close(model.lm_head.weight, _weights(one)["lm_head.weight"], rtol=1e-5, atol=1e-6)
    # ... and one process resumes a two-process run's step-2 checkpoint.
    for extra in ("metrics.png", "first.jsonl", "refused.txt"):
        (two / extra).unlink()
    (two / "checkpoints" / "step-00000004" / "trainer_state.pt").unlink()
    resumed = train("sft", {**config, "output_dir": str(two), "resume": True})
    assert resumed["steps"] == 4 and resumed["checkpoint"].endswith("step-00000004")
    _assert_same_records(_records(two / "metrics.jsonl"), want)
    _assert_same_weights(_weights(two), _weights(one))


# GRPO or PPO under torchrun: record what each rank samples (its share) and the rollout
# it trains on (everyone's), run 4 steps, then resume from the step-2 checkpoint.
ONLINE_WORKER = """
import json, shutil, sys
from pathlib import Path
import torch.distributed as dist
from fastpo.engine import shutdown_distributed, train
from fastpo.engine.algorithms import _online

config = json.loads(sys.argv[1])
algorithm = config.pop("algorithm")
run_dir = Path(config["output_dir"])
calls = []
sample_completions, sample_components = _online.sample_completions, _online.OnlineRun.sample_components

def recording_sample_completions(model, tokenizer, prompts, **options):
    calls.append({"sampled_here": list(prompts)})
    return sample_completions(model, tokenizer, prompts, **options)

def recording_sample_components(self, model, rows):  # under OnlineRun.sample too
    rollout, components = sample_components(self, model, rows)
    calls[-1].update(rows=[row["prompt"] for row in rows], prompts=rollout.prompts,
                     completions=rollout.completions, rewards=self.rewards.combine(components).tolist(),
                     width=rollout.input_ids.shape[1], tokens=int(rollout.mask.sum()))
    return rollout, components

_online.sample_completions = recording_sample_completions
_online.OnlineRun.sample_components = recording_sample_components
first = train(algorithm, config)
if dist.get_rank() == 0:
    shutil.copy(run_dir / "metrics.jsonl", run_dir / "first.jsonl")
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
dist.barrier()
resumed = train(algorithm, {**config, "resume": True})
summaries = [first.get("generated_tokens"), resumed.get("generated_tokens")]
(run_dir / f"calls-{dist.get_rank()}.json").write_text(json.dumps({"calls": calls, "generated": summaries}))
shutdown_distributed()
"""


# 8 completions per rollout, one optimizer step of 2 micro-batches of 4: GRPO's 2
# prompts x 4 samples, PPO's 8 prompts x 1 (one epoch, so one rollout per step).
ROLLOUT = {"grpo": {"prompts_per_rollout": 2, "num_generations": 4},
           "ppo": {"prompts_per_rollout": 8, "num_generations": 1, "num_iterations": 1}}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_online_rl_under_two_processes_splits_generation_and_resumes(tmp_path, algorithm):
    eval_file = tmp_path / "heldout.jsonl"
    eval_file.write_text('{"prompt": "12+34="}\n{"prompt": "1+2="}\n')
    config = {"algorithm": algorithm, **ROLLOUT[algorithm], "steps": 4, "batch_size": 4, "grad_accum_steps": 2,
              "max_new_tokens": 4, "warmup_steps": 1, "learning_rate": 1e-3, "log_every": 1, "eval_every": 0,
              "save_every": 2, "warm_start_steps": 0, "device": "cpu", "eval_data": str(eval_file),
              "rewards": ["online_rewards:digit_share"], "output_dir": str(tmp_path)}
    _run_two_processes(ONLINE_WORKER, config, tmp_path)

    written = [json.loads((tmp_path / f"calls-{rank}.json").read_text()) for rank in (0, 1)]
    calls = [rank["calls"] for rank in written]
    # 4 rollouts, then rollouts 2 and 3 again after resuming from the step-2 checkpoint.
    assert len(calls[0]) == len(calls[1]) == 6
    for first, second in zip(*calls):
        # Each rank sampled its half of the rollout's rows, in order ...
        assert first["sampled_here"] == first["rows"][:4] and second["sampled_here"] == first["rows"][4:]
        # ... and both trained on the whole, identical rollout.
        assert first["rows"] == second["rows"] == first["prompts"] == second["prompts"]
        for key in ("completions", "rewards", "width", "tokens"):
            assert first[key] == second[key], key
    # Resuming restored every rank's sampling RNG: the same rollouts, the same log.
    for rank_calls in calls:
        assert rank_calls[4:] == rank_calls[2:4]
    if algorithm == "grpo":  # the whole run's decoded tokens, the same on each rank and after resuming
        total = sum(call["tokens"] for call in calls[0][:4])
        assert written[0]["generated"] == written[1]["generated"] == [total, total]
    records = _records(tmp_path / "metrics.jsonl")
    _assert_same_records(records, _records(tmp_path / "first.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4] and any(r["grad_norm"] > 0 for r in records)
