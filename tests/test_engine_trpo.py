"""fastpo trpo: conjugate gradient, the exact KL-Hessian-vector product, the trust-region
line search (against references computed independently, in float64) and learning."""

import copy
import json
import math

import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastpo.engine.algorithms import trpo
from fastpo.engine.config import ConfigError, TRPOConfig
from fastpo.engine.forward import IGNORE_INDEX, encode_responses
from fastpo.engine.rollout import Rollout
from fastpo.engine.runner import train
from fastpo.engine.task import AdditionTask
from fastpo.engine.tokenizer import build_char_tokenizer
from fastpo.engine.tree_rollout import tree_advantages
from fastpo.kernels import group_advantages

DIGIT_REWARD = "test_engine_trpo:digit_reward"
QUICK = {"warm_start_steps": 0, "prompts_per_rollout": 4, "num_generations": 4, "batch_size": 8,
         "max_new_tokens": 4, "log_every": 1, "eval_every": 0}


def digit_reward(prompts, completions, **_):
    """A reward that a random model's completions already vary in."""
    return [sum(c.isdigit() for c in completion) / 4 for completion in completions]


def _small_model(seed=0):
    """A 1-layer GPT-2 of width 8 on the character tokenizer, in float64 throughout (Llama's
    RMSNorm computes in float32, too coarse for a float64 reference)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_char_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=8, n_layer=1, n_head=2, n_positions=64,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).double().eval(), tokenizer


def _chunk(tokenizer, advantages):
    """One rollout chunk of four completions of different lengths."""
    batch = encode_responses(tokenizer, ["1+2=", "12+34=", "5+5=", "9+0="], ["3", "46", "10x", "9"], 32)
    mask = batch["labels"] != IGNORE_INDEX
    per_token = torch.tensor(advantages, dtype=torch.float64)[:, None].expand(mask.shape)[mask]
    return {**batch, "mask": mask, "targets": batch["labels"][mask], "advantages": per_token}


def _reference_logits(model, chunk, temperature):
    """Float64 logits / T at the completion tokens, from the model's own forward."""
    logits = model(input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"]).logits
    return logits[chunk["mask"]] / temperature


def _reference_kl(old_logits, new_logits):
    """Mean over tokens of KL(softmax(old) || softmax(new)), written out."""
    p = torch.softmax(old_logits, -1)
    return (p * (torch.log(p) - torch.log_softmax(new_logits, -1))).sum(-1).mean()


def test_conjugate_gradient_solves_a_known_spd_system():
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, dtype=torch.float64, generator=generator)
    a = m @ m.T + 0.5 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, dtype=torch.float64, generator=generator)
    x, curvature = trpo.conjugate_gradient(lambda v: a @ v, b, 12)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(curvature, x @ a @ x)
    # A diagonal matrix with 3 distinct eigenvalues: exact after 3 iterations.
    d = torch.tensor([1.0, 1.0, 4.0, 4.0, 9.0], dtype=torch.float64)
    torch.testing.assert_close(trpo.conjugate_gradient(lambda v: d * v, b[:5], 3)[0], b[:5] / d)
    # Stopped early, x^T A x from the kept residual is still that of the x returned.
    for iterations in (1, 2, 5):
        x, curvature = trpo.conjugate_gradient(lambda v: a @ v, b, iterations)
        torch.testing.assert_close(curvature, x @ a @ x, rtol=1e-10, atol=0)


def test_preconditioned_conjugate_gradient_solves_the_system_and_starts_along_the_preconditioned_gradient():
    generator = torch.Generator().manual_seed(1)
    m = torch.randn(10, 10, dtype=torch.float64, generator=generator)
    a = m @ m.T + 0.5 * torch.eye(10, dtype=torch.float64)
    b = torch.randn(10, dtype=torch.float64, generator=generator)
    inverse = torch.rand(10, dtype=torch.float64, generator=generator) + 0.1
    x, curvature = trpo.conjugate_gradient(lambda v: a @ v, b, 10, inverse)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-8)
    # One iteration: the step along M^-1 b that minimizes the quadratic 0.5 x^T A x - b^T x.
    x, curvature = trpo.conjugate_gradient(lambda v: a @ v, b, 1, inverse)
    z = inverse * b
    torch.testing.assert_close(x, (b @ z) / (z @ a @ z) * z)
    torch.testing.assert_close(curvature, x @ a @ x)


def test_gradient_rms_preconditioner_is_adams_second_moment_and_resumes_from_a_checkpoint_state():
    update = trpo.TRPOUpdate(model=None, params=[], config=TRPOConfig(), world=None)
    generator = torch.Generator().manual_seed(2)
    scales = torch.logspace(-4, 1, 6)  # gradients of very different sizes per parameter
    gradients = [torch.randn(6, generator=generator) * scales for _ in range(4)]
    decay, eps = trpo._RMS_DECAY, trpo._RMS_EPS
    square_average = [0.0] * 6
    for k, gradient in enumerate(gradients[:3]):
        inverse = update.gradient_rms_preconditioner(gradient)
        update.updates += 1  # what step() counts after each update
        for i, g in enumerate(gradient.double().tolist()):
            square_average[i] = decay * square_average[i] + (1 - decay) * g * g
            expected = 1 / (math.sqrt(square_average[i] / (1 - decay ** (k + 1))) + eps)
            assert inverse[i].item() == pytest.approx(expected, rel=1e-5)
        if k == 0:  # Adam's first step: the preconditioned gradient is the gradient's sign (up to eps)
            torch.testing.assert_close(inverse * gradient, gradient.sign(), rtol=1e-3, atol=0)
    resumed = trpo.TRPOUpdate(model=None, params=[], config=TRPOConfig(), world=None)
    resumed.load_state_dict({"step": 3, **copy.deepcopy(update.state_dict())})
    torch.testing.assert_close(resumed.gradient_rms_preconditioner(gradients[3]),
                               update.gradient_rms_preconditioner(gradients[3]))


def test_tree_advantages_reach_the_chunks_per_token():
    tokenizer = build_char_tokenizer()
    prompts = ["1+2=", "1+2=", "1+2=", "5+5=", "5+5=", "5+5="]
    completions = ["3", "31", "4", "10", "10", "11"]  # shared prefixes within each group of 3
    batch = encode_responses(tokenizer, prompts, completions, 32)
    rollout = Rollout(prompts, completions, batch["input_ids"], batch["attention_mask"], batch["labels"],
                      torch.zeros(batch["labels"].shape), torch.zeros(6, dtype=torch.bool))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    z_scores = group_advantages(rewards, 3, scale="group", eps=1e-4)
    per_token = tree_advantages(rollout, z_scores, 3)
    # TRPO hands TreeRL the group z-scores: the same advantages as of the rewards scaled by
    # their group's std, as GRPO's tree rollout scales them (each group's mean cancels).
    groups = rewards.view(2, 3)
    scaled = (groups / (groups.std(dim=1, keepdim=True) + 1e-4)).flatten()
    torch.testing.assert_close(per_token, tree_advantages(rollout, scaled, 3))
    mask = rollout.mask
    # "3" (right) and "31" (wrong) share their first token: one node, one advantage.
    assert per_token[0][mask[0]][0] == per_token[1][mask[1]][0] and z_scores[0] != z_scores[1]
    chunks = trpo.rollout_chunks(rollout, per_token, batch_size=4)
    torch.testing.assert_close(torch.cat([chunk["advantages"] for chunk in chunks]), per_token[mask])
    chunks = trpo.rollout_chunks(rollout, z_scores, batch_size=4)  # one per completion, on each of its tokens
    torch.testing.assert_close(torch.cat([chunk["advantages"] for chunk in chunks]),
                               z_scores[:, None].expand(mask.shape)[mask])


def test_kl_hessian_vector_product_matches_the_explicit_hessian():
    model, tokenizer = _small_model()
    temperature = 0.7
    chunk = _chunk(tokenizer, [1.0, -1.0, 0.5, 0.0])
    with torch.no_grad():
        # At theta_old, where TRPO takes the products, the KL's Hessian is the Fisher matrix.
        reference_old = _reference_logits(model, chunk, temperature)
    names = ["transformer.ln_f.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.weight"]
    named = dict(model.named_parameters())
    params = [named[name] for name in names]
    for name, parameter in named.items():
        parameter.requires_grad_(name in names)
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def kl_of(vector):
        pieces = dict(zip(names, (piece.view_as(p) for piece, p in zip(vector.split([p.numel() for p in params]), params))))
        new = functional_call(model, pieces, kwargs={"input_ids": chunk["input_ids"],
                                                     "attention_mask": chunk["attention_mask"]}).logits
        return _reference_kl(reference_old, new[chunk["mask"]] / temperature)

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no second derivative
        hessian = torch.autograd.functional.hessian(kl_of, flat)
    product = trpo.kl_hessian_product(model, params, [chunk], temperature)
    for seed in range(3):
        vector = torch.randn(flat.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(product(vector), hessian @ vector, rtol=1e-9, atol=1e-12)


def test_every_nth_completion_counts_across_chunks():
    # Ten completions (completion i holds the tokens 10i, 10i+1, 10i+2) in chunks of 4, 4
    # and 2; every third: completions 0, 3, 6 and 9.
    ids = torch.arange(10)[:, None] * 10 + torch.arange(3)
    chunks = [{"input_ids": ids[start : start + 4], "attention_mask": torch.ones_like(ids[start : start + 4]),
               "mask": ids[start : start + 4] % 20 < 10, "targets": None} for start in (0, 4, 8)]
    picked = trpo.every_nth_completion(chunks, 3)
    assert [len(chunk["input_ids"]) for chunk in picked] == [2, 1, 1]
    assert torch.equal(torch.cat([chunk["input_ids"] for chunk in picked]), ids[[0, 3, 6, 9]])
    assert torch.equal(torch.cat([chunk["mask"] for chunk in picked]), ids[[0, 3, 6, 9]] % 20 < 10)
    assert all(set(chunk) == {"input_ids", "attention_mask", "mask"} for chunk in picked)
    assert torch.equal(torch.cat([chunk["input_ids"] for chunk in trpo.every_nth_completion(chunks, 1)]), ids)


def test_an_accepted_update_keeps_the_measured_kl_and_improves_the_surrogate():
    model, tokenizer = _small_model(seed=1)
    chunk = _chunk(tokenizer, [1.0, -1.0, 0.5, -0.5])
    config = TRPOConfig(max_kl=0.005, temperature=0.9)
    old = copy.deepcopy(model)
    stats, surrogate = trpo.trpo_update(model, [chunk], config)
    assert stats["accepted"] == 1.0
    with torch.no_grad():
        old_logits = _reference_logits(old, chunk, config.temperature)
        new_logits = _reference_logits(model, chunk, config.temperature)
        targets = chunk["targets"][:, None]
        ratio = torch.exp(new_logits.log_softmax(-1).gather(-1, targets) - old_logits.log_softmax(-1).gather(-1, targets))
        new_surrogate = float((ratio.squeeze(-1) * chunk["advantages"]).mean())
        old_surrogate = float(chunk["advantages"].mean())
        kl = float(_reference_kl(old_logits, new_logits))
    assert 0 < kl <= config.max_kl and stats["kl"] == pytest.approx(kl, rel=1e-5)
    assert new_surrogate > old_surrogate
    assert stats["surrogate_improvement"] == pytest.approx(new_surrogate - old_surrogate, rel=1e-5)
    assert surrogate == pytest.approx(new_surrogate, rel=1e-6)


def test_zero_advantages_make_no_step():
    model, tokenizer = _small_model()
    before = copy.deepcopy(model.state_dict())
    stats, _ = trpo.trpo_update(model, [_chunk(tokenizer, [0.0, 0.0, 0.0, 0.0])], TRPOConfig())
    assert stats == {"surrogate_improvement": 0.0, "kl": 0.0, "accepted": 0.0, "backtracks": 0.0}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_every_logged_accepted_step_keeps_the_trust_region(tmp_path):
    max_kl = 0.01
    summary = train("trpo", {**QUICK, "steps": 3, "max_kl": max_kl, "rewards": [DIGIT_REWARD],
                             "output_dir": str(tmp_path)})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # One rollout of 4 prompts x 4 completions a step: the decoded tokens of the run.
    assert summary["generated_tokens"] == round(sum(16 * r["completion_length"] for r in records)) > 0
    for record in records:
        assert {"surrogate", "surrogate_improvement", "kl", "accepted", "backtracks", "reward"} <= set(record)
        # TRPO's own step on the loop's update hook: no AdamW, no loss, no fake zero gradient norm.
        assert not {"loss", "lr", "grad_norm"} & set(record)
        if record["accepted"]:
            assert 0 < record["kl"] <= max_kl and record["surrogate_improvement"] > 0
        else:
            assert record["kl"] == 0 and record["surrogate_improvement"] == 0
    assert any(record["accepted"] for record in records)


@pytest.mark.parametrize("override, message", [
    ({"grad_accum_steps": 2}, "option 'grad_accum_steps': got 2"),
    ({"num_iterations": 2}, "option 'num_iterations': got 2"),
    ({"backtrack_factor": 1.0}, "option 'backtrack_factor': got 1.0"),
    ({"weight_decay": 0.1}, "option 'weight_decay': got 0.1"),
    ({"advantage": "value"}, "option 'advantage': got 'value'"),
    ({"cg_preconditioner": "adam"}, "option 'cg_preconditioner': got 'adam'"),
])
def test_bad_options_name_the_option_and_value(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train("trpo", {**QUICK, **override, "output_dir": str(tmp_path)})


@pytest.mark.slow
def test_trpo_raises_the_training_reward_from_a_warm_start(tmp_path):
    # Sixteen built-in training prompts, the same in every rollout. The warm start (20 SFT
    # steps on their answers, passed as the model) answers most of them right greedily
    # but samples few right answers at temperature 1: the reward TRPO raises. Conjugate
    # gradient as before issue 16 (10 iterations, products on the whole rollout, group
    # advantages, no preconditioner): on these small rollouts of few right answers the
    # gradient_rms preconditioner does not raise it within 8 steps (0.057 to 0.073).
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in AdditionTask().sft_examples(16, "train")))
    sft = train("sft", {"data": str(prompts), "eval_data": str(prompts), "steps": 20, "batch_size": 16,
                        "learning_rate": 2e-3, "warmup_steps": 5, "eval_every": 0, "output_dir": str(tmp_path / "sft")})
    result = train("trpo", {
        "model": sft["checkpoint"] + "/model", "data": str(prompts), "eval_data": str(prompts), "steps": 8,
        "prompts_per_rollout": 16, "num_generations": 4, "max_new_tokens": 4, "max_kl": 0.02, "cg_iters": 10,
        "fisher_every": 1, "advantage": "group", "cg_preconditioner": "none", "log_every": 1, "eval_every": 0,
        "output_dir": str(tmp_path / "trpo"),
    })
    records = [json.loads(line) for line in (tmp_path / "trpo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [record["reward"] for record in records]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert result["heldout_reward_after"] >= result["heldout_reward_before"]


@pytest.mark.slow
def test_trpo_defaults_raise_heldout_accuracy_on_the_builtin_task(tmp_path):
    # The no-argument run on seed 2, the seed where TRPO gained least: the accuracy-targeted
    # warm start (38% held-out exact match), then 60 TRPO updates (about 55 s of one CPU
    # thread). The defaults before (group advantages, no preconditioner, max_kl 0.02, 3
    # conjugate-gradient iterations on every 2nd completion, 50 steps) ended at 45% (+7);
    # these ended at 55% and 57% in two runs whose advantages differed only by rounding.
    summary = train("trpo", {"seed": 2, "output_dir": str(tmp_path)})
    assert 0.2 <= summary["heldout_accuracy_before"] <= 0.6  # the warm start's target region
    assert summary["heldout_accuracy_after"] >= summary["heldout_accuracy_before"] + 0.12
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for record in records:  # log_every=10: steps 10, 20, ..., 60
        if record["accepted"]:
            assert 0 < record["kl"] <= TRPOConfig().max_kl and record["surrogate_improvement"] > 0
