"""fastpo ppo: the CLI run and its metrics, RLHF reward shaping, PPO-ptx's gradient, the
value head in checkpoints, the separate critic, and learning on the built-in task."""

import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fastpo.engine import cli, train
from fastpo.engine.algorithms import _online, ppo
from fastpo.engine.config import ConfigError, PPOConfig, from_dict
from fastpo.engine.forward import IGNORE_INDEX

# Rollouts of 8 completions in micro-batches of 4, two passes: 4 optimizer steps each.
QUICK = {"warm_start_steps": 0, "prompts_per_rollout": 8, "batch_size": 4, "num_iterations": 2,
         "max_new_tokens": 4, "warmup_steps": 0, "log_every": 1, "eval_every": 0, "learning_rate": 1e-3}
LENGTH_REWARD = "test_engine_ppo:length_reward"


def length_reward(prompts, completions, **_):
    """A reward that a random model's completions already vary in."""
    return [len(completion) / 4 for completion in completions]


def _records(path):
    """metrics.jsonl without its wall-clock field."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record.pop("step_time_s")
    return records


def _captured_run(monkeypatch, options):
    """``ppo.run`` up to the shared loop (``OnlineRun.train``'s call): its model, loss_fn and rollout stream."""
    captured = {}

    def capture(model, tokenizer, config, loss_fn, batches, run_dir, evaluate, update=None):
        captured.update(model=model, loss_fn=loss_fn, batches=batches)
        return {"metrics": {}}

    monkeypatch.setattr(_online, "train_and_evaluate", capture)
    ppo.run(from_dict(PPOConfig, options))
    return captured


def _float64_logprobs(model, batch):
    """Log-probs of ``batch["labels"]`` from the model's own logits, in float64."""
    model = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    logprobs = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels != IGNORE_INDEX, logprobs, 0.0)


def test_cli_run_logs_the_documented_metrics(tmp_path):
    texts = tmp_path / "pretraining.jsonl"
    texts.write_text("".join(json.dumps({"text": f"{n} is {n % 7} mod 7."}) + "\n" for n in range(10)))
    args = [f"{key}={value}" for key, value in QUICK.items()] + [
        "steps=6", "beta=0.1", "kl_target=0.05", "kl_horizon=100", "entropy_coef=0.01", f"ptx_data={texts}",
        "ptx_coef=0.5", f"rewards={LENGTH_REWARD}", f"output_dir={tmp_path / 'run'}",
    ]
    assert cli.main(["ppo", *args]) == 0
    records = _records(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    documented = {"loss", "reward", "completion_length", "truncated", "kl", "kl_coef", "policy_loss", "value_loss",
                  "value_clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max", "approx_kl",
                  "entropy_mean", "ptx_loss"}
    for record in records:
        assert documented <= set(record) and all(record[name] == record[name] for name in documented)
    assert records[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # first step: the sampling policy itself
    assert records[0]["ptx_loss"] > 0
    # The second rollout (steps 5..8) is shaped with the controller's update from the first
    # (steps 1 and 2 are its two micro-batches of 4 completions, a pass of the rollout).
    rollout_kl = (records[0]["kl"] + records[1]["kl"]) / 2
    assert records[0]["kl_coef"] == records[3]["kl_coef"] == pytest.approx(0.1)
    expected = ppo.adaptive_kl_coef(0.1, rollout_kl, target=0.05, horizon=100, completions=8)
    assert records[4]["kl_coef"] == pytest.approx(expected, rel=1e-6)


def test_adaptive_kl_coefficient_follows_ziegler_et_al():
    # error = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + error * n / horizon
    def coef(kl):
        return ppo.adaptive_kl_coef(0.1, kl, target=6.0, horizon=10000, completions=64)

    assert coef(9.0) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    assert coef(5.4) == pytest.approx(0.1 * (1 - 0.1 * 64 / 10000))
    assert ppo.adaptive_kl_coef(0.1, 0.0, target=6.0, horizon=100, completions=50) == pytest.approx(0.1 * (1 - 0.2 * 0.5))


@pytest.mark.parametrize("options,message", [
    ({"ptx_coef": 0.5}, "option 'ptx_coef': got 0.5, but ptx_data is none"),
    ({"ptx_data": "builtin:addition"}, "option 'ptx_data': got 'builtin:addition', but ptx_coef is 0"),
    ({"ptx_data": "builtin:other", "ptx_coef": 1.0}, "option 'ptx_data': got 'builtin:other'"),
    ({"lam": 1.5}, r"option 'lam': got 1.5; expected a value in \[0, 1\]"),
    ({"critic": "no/such/folder"}, "option 'critic': got 'no/such/folder'"),
    ({"prompts_per_rollout": 6}, "option 'prompts_per_rollout': 6 prompts"),
])
def test_bad_options_are_config_errors(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        train("ppo", {**QUICK, "steps": 2, "output_dir": str(tmp_path), **options})


# k1 is the InstructGPT shaping; any other registered estimator reaches it by kl_kind.
@pytest.mark.parametrize("kl_kind", ["k1", "k3"])
def test_shaped_rewards_fed_to_gae_match_a_per_element_reference(tmp_path, monkeypatch, kl_kind):
    beta = 0.3
    seen = {}
    real_gae, real_split = ppo.gae, ppo.split_micro_batches

    def recording_gae(rewards, *args, **kwargs):
        seen["rewards"] = rewards
        return real_gae(rewards, *args, **kwargs)

    def recording_split(tensors, *args):
        seen["rollout"] = tensors
        return real_split(tensors, *args)

    monkeypatch.setattr(ppo, "gae", recording_gae)
    monkeypatch.setattr(ppo, "split_micro_batches", recording_split)
    run = _captured_run(monkeypatch, {**QUICK, "steps": 4, "beta": beta, "whiten_advantages": False,
                                      "kl_kind": kl_kind, "rewards": [LENGTH_REWARD], "output_dir": str(tmp_path)})
    model = run["model"]
    reference = copy.deepcopy(model)  # the reference is the model at the start of the run
    with torch.no_grad():  # move the policy away from it, so that k1 is not 0
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    next(run["batches"](0))

    rollout = seen["rollout"]
    old, ref = _float64_logprobs(model, rollout), _float64_logprobs(reference, rollout)
    scores = rollout["metric/reward"].double()
    mask = rollout["mask"]
    expected = torch.zeros(mask.shape, dtype=torch.float64)
    for i in range(mask.shape[0]):
        valid = [t for t in range(mask.shape[1]) if mask[i, t]]
        for t in valid:
            d = float(old[i, t] - ref[i, t])
            expected[i, t] = -beta * (d if kl_kind == "k1" else math.exp(-d) + d - 1)  # k3 written out
        expected[i, valid[-1]] += scores[i]
    assert scores.abs().sum() > 0 and (old - ref)[mask].abs().max() > 1e-3
    torch.testing.assert_close(seen["rewards"].double(), expected, rtol=0, atol=2e-5)


def test_ptx_gradient_is_the_ppo_gradient_plus_ptx_coef_times_the_lm_gradient(tmp_path, monkeypatch):
    ptx_coef = 0.7
    run = _captured_run(monkeypatch, {**QUICK, "steps": 4, "ptx_data": "builtin:addition", "ptx_coef": ptx_coef,
                                      "rewards": [LENGTH_REWARD], "output_dir": str(tmp_path)})
    model, loss_fn = run["model"], run["loss_fn"]
    batch = next(run["batches"](0))
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    # The loop back-propagates loss / N, N the step's completion tokens (one micro-batch here).
    units = batch["num_units"]
    total = gradient(loss_fn(model, batch)[0] / units)
    ppo_only = gradient(loss_fn(model, {k: v for k, v in batch.items() if not k.startswith("ptx_")})[0] / units)
    logits = model(input_ids=batch["ptx_input_ids"], attention_mask=batch["ptx_attention_mask"]).logits
    labels = batch["ptx_labels"]
    targets = labels != IGNORE_INDEX
    token_logprobs = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    lm = gradient(-token_logprobs[targets].mean())
    assert targets.sum() > 0 and max(g.abs().max() for g in ppo_only) > 0
    for got, policy_part, lm_part in zip(total, ppo_only, lm):
        torch.testing.assert_close(got, policy_part + ptx_coef * lm_part, rtol=1e-4, atol=1e-6)


def test_resume_restores_the_value_head_and_reproduces_the_run(tmp_path):
    # Rollouts of 4 steps, checkpoints every 3: the resumed run restarts mid-rollout, with
    # the buffer, the adaptive beta, the pretraining stream and the value head to restore.
    options = {**QUICK, "steps": 6, "save_every": 3, "kl_target": 0.05, "kl_horizon": 100,
               "ptx_data": "builtin:addition", "ptx_coef": 0.5, "rewards": [LENGTH_REWARD], "lr_schedule": "constant"}
    full = train("ppo", {**options, "output_dir": str(tmp_path / "full")})
    head = load_file(tmp_path / "full" / "checkpoints" / "step-00000003" / "model" / "model.safetensors")
    assert head["value_head.weight"].abs().sum() > 0  # trained, not its zero init

    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000006")
    resumed = train("ppo", {**options, "output_dir": str(tmp_path / "resumed"), "resume": True})
    assert _records(tmp_path / "resumed" / "metrics.jsonl") == _records(tmp_path / "full" / "metrics.jsonl")
    for key in ("loss", "heldout_accuracy_after", "generated_tokens"):
        assert resumed[key] == full[key]
    # Rollouts of 8 completions in micro-batches of 4, two passes: the first pass's two
    # steps (1, 2 and 5, 6) log each completion once.
    records = _records(tmp_path / "full" / "metrics.jsonl")
    first_pass = [r for r in records if r["step"] % 4 in (1, 2)]
    assert full["generated_tokens"] == round(sum(4 * r["completion_length"] for r in first_pass)) > 0
    final = [load_file(tmp_path / run / "checkpoints" / "step-00000006" / "model" / "model.safetensors")
             for run in ("full", "resumed")]
    assert torch.equal(final[0]["value_head.weight"], final[1]["value_head.weight"])


def test_a_separate_critic_is_trained_and_checkpointed(tmp_path):
    critic = train("reward", {"steps": 1, "batch_size": 4, "warm_start_steps": 0, "eval_every": 0,
                              "output_dir": str(tmp_path / "critic")})
    summary = train("ppo", {**QUICK, "steps": 2, "critic": critic["checkpoint"] + "/model",
                            "rewards": [LENGTH_REWARD], "output_dir": str(tmp_path / "ppo")})
    weights = load_file(tmp_path / "ppo" / "checkpoints" / "step-00000002" / "model" / "model.safetensors")
    start = load_file(tmp_path / "critic" / "checkpoints" / "step-00000001" / "model" / "model.safetensors")
    assert "value_head.weight" not in weights
    assert not torch.equal(weights["critic.score.weight"], start["score.weight"])  # trained with the policy
    assert summary["loss"] is not None


@pytest.mark.slow
def test_ppo_raises_the_training_reward_on_the_builtin_task(tmp_path):
    # SFT at the warm start's batch 64 and constant learning rate 2e-3 until 20% held-out
    # exact match (checked every 50 steps; a fixed step count lands elsewhere on a CPU that
    # rounds differently: 400 cosine steps left too weak a policy there for PPO to move).
    # One warm start for every seed; each seed samples and trains its own PPO run from it
    # (rollouts of 128 completions, 4 optimizer steps each; a weak KL penalty: the test
    # measures reward).
    warm = train("sft", {"steps": 1500, "batch_size": 64, "learning_rate": 2e-3, "warmup_steps": 20,
                         "lr_schedule": "constant", "eval_every": 50, "target_accuracy": 0.2,
                         "output_dir": str(tmp_path / "sft")})
    options = {"model": warm["checkpoint"] + "/model", "warm_start_steps": 0, "steps": 120, "lr_schedule": "constant",
               "beta": 0.01, "vf_coef": 0.05, "max_new_tokens": 4, "eval_every": 0, "log_every": 1}
    gains = []
    for seed in (0, 1):
        train("ppo", {**options, "seed": seed, "output_dir": str(tmp_path / f"ppo-{seed}")})
        rewards = [record["reward"] for record in _records(tmp_path / f"ppo-{seed}" / "metrics.jsonl")]
        gains.append(sum(rewards[-30:]) / 30 - sum(rewards[:30]) / 30)  # the last 30 steps against the first 30
    # Measured: +0.16 and +0.18 (2026-12-05; the warm start stopped at step 500). 400 fixed
    # SFT steps gave +0.10 and +0.07 on one machine and -0.016, -0.009 on another. Each mean's
    # noise is about 0.01.
    assert min(gains) > 0.03, gains
