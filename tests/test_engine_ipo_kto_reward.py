"""IPO, KTO and the reward model on builtin:tiny: exact first-step losses of the untrained
state, learning on small memorizable sets, checkpoints and clear config errors."""

import json
import math

import pytest
import torch

from fastpo.engine import ConfigError, train
from fastpo.engine.task import AdditionTask

QUICK = {"batch_size": 8, "warmup_steps": 2, "log_every": 1, "eval_every": 0, "warm_start_steps": 0}


def _losses(summary):
    with open(summary["metrics_file"]) as f:
        return [json.loads(line)["loss"] for line in f]


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    task = AdditionTask(seed=5)
    return {
        "pairs": _write(tmp_path / "pairs.jsonl", task.preference_pairs(16)),
        "unary": _write(tmp_path / "unary.jsonl", task.unary_examples(16)),  # 8 desirable, 8 undesirable
        "ranked": _write(tmp_path / "ranked.jsonl", task.rankings(16, k=3)),
    }


# ---------------------------------------------------------------- IPO


@pytest.mark.parametrize("average", [True, False])
def test_ipo_first_loss_is_the_squared_target_margin(tmp_path, average):
    summary = train("ipo", {**QUICK, "steps": 2, "beta": 0.25, "average": average, "output_dir": str(tmp_path)})
    # The policy equals its reference at step 1: h = 0, loss (0 - 1/(2*0.25))**2 = 4,
    # whether the log-probs are averaged or summed.
    assert _losses(summary)[0] == pytest.approx(4.0, abs=1e-4)
    assert summary["algorithm"] == "ipo" and summary["status"] == "completed"
    assert summary["preference_accuracy_before"] == 0.5  # every implicit reward ties
    assert 0.0 <= summary["heldout_accuracy_after"] <= 1.0


def test_ipo_learns_a_small_preference_set(tmp_path, files):
    summary = train("ipo", {**QUICK, "data": files["pairs"], "eval_data": files["pairs"], "steps": 12,
                            "learning_rate": 3e-3, "beta": 0.5, "output_dir": str(tmp_path / "run")})
    losses = _losses(summary)
    assert losses[0] == pytest.approx(1.0, abs=1e-4)  # (1 / (2 * 0.5))**2
    assert sum(losses[-3:]) / 3 < 0.3 * losses[0]
    assert summary["preference_accuracy_after"] >= 0.8


def test_ipo_and_dpo_ipo_agree_on_the_first_step(tmp_path):
    """ipo is dpo's loss_type=ipo with averaged log-probs by default (TRL)."""
    run = {**QUICK, "steps": 1, "beta": 0.4}
    ipo = train("ipo", {**run, "output_dir": str(tmp_path / "ipo")})
    dpo = train("dpo", {**run, "loss_type": "ipo", "average": True, "output_dir": str(tmp_path / "dpo")})
    assert _losses(ipo) == _losses(dpo)


# ---------------------------------------------------------------- KTO


def test_kto_first_loss_on_the_builtin_task(tmp_path):
    summary = train("kto", {**QUICK, "steps": 2, "output_dir": str(tmp_path)})
    # Step 1: policy == reference, so rw = 0 and z0 = max(0, 0) = 0; every example costs
    # its weight * (1 - sigmoid(0)) = 1/2 with both weights 1.
    assert _losses(summary)[0] == pytest.approx(0.5, abs=1e-6)
    assert summary["preference_accuracy_before"] == 0.5 and "preference_accuracy_after" in summary


def test_kto_weights_enter_the_first_loss(tmp_path, files):
    summary = train("kto", {**QUICK, "data": files["unary"], "eval_data": files["pairs"], "batch_size": 16,
                            "steps": 1, "desirable_weight": 2.0, "undesirable_weight": 0.5,
                            "output_dir": str(tmp_path / "run")})
    # One batch of the 16 rows, 8 desirable and 8 undesirable, each at 1 - sigmoid(0) = 1/2:
    # (8 * 2.0 * 0.5 + 8 * 0.5 * 0.5) / 16 = 0.625.
    assert _losses(summary)[0] == pytest.approx(0.625, abs=1e-6)


def test_kto_learns_a_small_unary_set(tmp_path):
    """Each of 16 prompts appears twice, its correct answer desirable and a corrupted one
    undesirable: the unary labels alone must turn into a ranking of those pairs."""
    pairs = AdditionTask(seed=5).preference_pairs(16)
    unary = [row for pair in pairs for row in (
        {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
        {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False},
    )]
    summary = train("kto", {**QUICK, "data": _write(tmp_path / "unary.jsonl", unary),
                            "eval_data": _write(tmp_path / "pairs.jsonl", pairs), "batch_size": 16, "steps": 20,
                            "learning_rate": 3e-3, "beta": 1.0, "output_dir": str(tmp_path / "run")})
    losses = _losses(summary)
    assert sum(losses[-3:]) / 3 < 0.2 * losses[0]
    records = [json.loads(line) for line in open(summary["metrics_file"])]
    assert records[0]["z0"] == 0.0 and all(r["z0"] >= 0 for r in records)
    assert records[-1]["signed_reward"] > 0  # desirable rewards up, undesirable ones down
    assert summary["preference_accuracy_before"] == 0.5
    assert summary["preference_accuracy_after"] >= 0.9


def test_kto_rejects_bad_options(tmp_path, files):
    with pytest.raises(ConfigError, match="'batch_size'.*at least 2"):
        train("kto", {"batch_size": 1, "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="both 0"):
        train("kto", {"desirable_weight": 0, "undesirable_weight": 0, "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="'desirable_weight'.*>= 0"):
        train("kto", {"desirable_weight": -1, "output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="line 1: field 'chosen' is missing"):
        train("kto", {**QUICK, "steps": 1, "eval_data": files["unary"], "output_dir": str(tmp_path)})


# ---------------------------------------------------------------- reward model


def test_reward_with_a_zero_head_starts_at_log_2_and_saves_its_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from fastpo.engine.algorithms._pairs import encode_pairs
    from fastpo.engine.algorithms.reward import reward_scores
    from fastpo.engine.tokenizer import build_char_tokenizer

    summary = train("reward", {**QUICK, "steps": 3, "head_init_std": 0, "output_dir": str(tmp_path)})
    # The new head is zero: every score is 0, -log sigmoid(0 - 0) = log 2, every pair ties.
    assert _losses(summary)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["preference_accuracy_before"] == 0.5 and "heldout_accuracy_before" not in summary
    model = AutoModelForSequenceClassification.from_pretrained(summary["checkpoint"] + "/model")
    assert model.config.num_labels == 1 and model.score.weight.abs().sum() > 0  # the trained head came back
    pairs = AdditionTask(seed=0).preference_pairs(3, "heldout")
    batch = encode_pairs(build_char_tokenizer(), pairs, 64)
    # Independent check of the scoring: the model's own forward reads the last non-pad token.
    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(reward_scores(model, batch), own, rtol=1e-5, atol=1e-6)


def test_a_new_reward_head_gives_unit_scale_scores():
    """The default head: normal(0, 1/sqrt(H)) from the seed, so the first scores are of
    unit scale (not all 0: a zero head is a saddle of the pairwise loss); the global RNG
    is left alone, and head_std=0 gives the zero head."""
    from fastpo.engine.algorithms._pairs import encode_pairs
    from fastpo.engine.algorithms.reward import load_reward_model, reward_scores

    state = torch.get_rng_state()
    model, tokenizer = load_reward_model("builtin:tiny", seed=1, head_std=None)
    assert torch.equal(torch.get_rng_state(), state)
    weight = model.score.weight.detach()
    assert weight.shape == (1, 128) and 0.8 / 128**0.5 < float(weight.std()) < 1.2 / 128**0.5
    assert torch.equal(load_reward_model("builtin:tiny", seed=1, head_std=None)[0].score.weight, weight)
    assert not torch.equal(load_reward_model("builtin:tiny", seed=2, head_std=None)[0].score.weight, weight)
    assert load_reward_model("builtin:tiny", seed=1)[0].score.weight.abs().max() == 0  # head_std=0
    with torch.no_grad():
        scores = reward_scores(model, encode_pairs(tokenizer, AdditionTask(seed=0).preference_pairs(64), 64))
    assert 0.3 < float(scores.std()) < 3.0


@pytest.mark.parametrize(
    "options, first_loss",
    [
        # scores are 0 at step 1:
        ({"margin": 1.0}, math.log(1 + math.e)),  # -log sigmoid(0 - 0 - 1)
        ({"center_coef": 0.5}, math.log(2)),  # + 0.5 * (0 + 0)**2
    ],
)
def test_reward_margin_and_centering(tmp_path, options, first_loss):
    summary = train("reward", {**QUICK, "steps": 1, "head_init_std": 0, "output_dir": str(tmp_path), **options})
    assert _losses(summary)[0] == pytest.approx(first_loss, abs=1e-6)


def test_reward_learns_a_small_preference_set(tmp_path, files):
    summary = train("reward", {**QUICK, "data": files["pairs"], "eval_data": files["pairs"], "steps": 20,
                               "learning_rate": 3e-3, "output_dir": str(tmp_path / "run")})
    losses = _losses(summary)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    assert summary["preference_accuracy_after"] >= 0.75


def test_reward_ranking_loss_on_ranked_rows(tmp_path, files):
    summary = train("reward", {**QUICK, "data": files["ranked"], "eval_data": files["ranked"], "steps": 20,
                               "learning_rate": 3e-3, "head_init_std": 0, "output_dir": str(tmp_path / "run")})
    losses = _losses(summary)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # mean over the 3 pairs of -log sigmoid(0)
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0]
    assert summary["preference_accuracy_after"] > summary["preference_accuracy_before"] == 0.5


def test_ranked_eval_rows_give_every_ordered_pair():
    from fastpo.engine.algorithms._pairs import ordered_pairs

    pairs = ordered_pairs([{"prompt": "p", "responses": ["a", "b", "c"]}])
    assert [(r["chosen"], r["rejected"]) for r in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]


def test_reward_rejects_bad_options_and_rows(tmp_path, files):
    run = {**QUICK, "steps": 1, "data": files["ranked"], "output_dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match="'ranking'.*ranked rows"):
        train("reward", {**run, "ranking": False})
    with pytest.raises(ConfigError, match="'margin' and 'center_coef'"):
        train("reward", {**run, "margin": 0.5})
    with pytest.raises(ConfigError, match="'center_coef'.*>= 0"):
        train("reward", {"center_coef": -1.0})
    ragged = _write(tmp_path / "ragged.jsonl", [{"prompt": "1+1=", "responses": ["2", "3"]},
                                                {"prompt": "1+2=", "responses": ["3", "4", "5"]}])
    with pytest.raises(ValueError, match="row 2: field 'responses' holds 3"):
        train("reward", {**run, "data": ragged})


def test_reward_on_states_is_binary_cross_entropy_and_learns_a_small_unary_set(tmp_path, files):
    # A zero head: every score 0, so the first loss is log 2 per row whatever the labels.
    first = train("reward", {**QUICK, "target": "states", "data": files["unary"], "eval_data": files["unary"],
                             "steps": 1, "head_init_std": 0, "output_dir": str(tmp_path / "zero")})
    assert _losses(first)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert first["value_accuracy_before"] == 0.5 and "preference_accuracy_before" not in first  # ties count 1/2
    summary = train("reward", {**QUICK, "target": "states", "data": files["unary"], "eval_data": files["unary"],
                               "batch_size": 16, "steps": 40, "learning_rate": 3e-3,
                               "output_dir": str(tmp_path / "run")})
    losses = _losses(summary)
    assert losses[-1] < losses[0]
    assert summary["value_accuracy_after"] >= 0.9 > summary["value_accuracy_before"]
    # Without eval_data a file's states have no held-out rows: no evaluation, not a made-up one.
    unevaluated = train("reward", {**QUICK, "target": "states", "data": files["unary"], "steps": 1,
                                   "output_dir": str(tmp_path / "none")})
    assert not any(key.startswith("value_accuracy") for key in unevaluated)


def test_reward_on_countdown_states_matches_a_float64_cross_entropy(tmp_path):
    from fastpo.engine.algorithms.reward import load_reward_model, reward_scores
    from fastpo.engine.countdown import CountdownTask, min_steps
    from fastpo.engine.forward import encode_responses

    # The built-in states: each a value prompt, labelled by whether the solver still reaches 24.
    task = CountdownTask(seed=3)
    rows = task.rows("states", 64)
    assert {row["label"] for row in rows} == {True, False} and all(row["completion"] == "" for row in rows)
    for row in rows:
        numbers = tuple(int(x) for x in row["prompt"].split(" to ")[0].split())
        assert row["label"] == (min_steps(numbers, 24) is not None)
        assert row["prompt"] == task.value_prompt(numbers, 24)
    run = {**QUICK, "data": "builtin:countdown", "target": "states", "model": "builtin:tiny", "steps": 1,
           "batch_size": 8, "seed": 3, "output_dir": str(tmp_path)}
    summary = train("reward", run)
    assert set(summary) >= {"value_accuracy_before", "value_accuracy_after"}
    # The one step's loss: the mean over its 8 rows (the run's whole training set) of
    # -[y log s(x) + (1 - y) log(1 - s(x))], in float64 from the same initial model.
    trained = task.rows("states", 8)
    model, tokenizer = load_reward_model("builtin:tiny", seed=3, head_std=None, characters=task.characters)
    with torch.no_grad():
        batch = encode_responses(tokenizer, [r["prompt"] for r in trained], [""] * 8, 64)
        scores = reward_scores(model.double(), batch).double()
    labels = torch.tensor([float(r["label"]) for r in trained], dtype=torch.float64)
    logsigmoid = torch.nn.functional.logsigmoid
    per_row = -(labels * logsigmoid(scores) + (1 - labels) * logsigmoid(-scores))
    assert _losses(summary)[0] == pytest.approx(float(per_row.mean()), rel=1e-4)
    # eval_data's rows, when given, are the held-out states: the same states labelled all
    # true, then all false, are each on the other side of 1/2 from the same scores.
    states = task.rows("states", 5, "heldout")
    accuracies = []
    for label in (True, False):
        path = _write(tmp_path / f"states_{label}.jsonl", [{**row, "label": label} for row in states])
        evaluated = train("reward", {**run, "eval_data": path, "output_dir": str(tmp_path / f"eval_{label}")})
        accuracies.append(evaluated["value_accuracy_before"])
    assert accuracies[0] + accuracies[1] == pytest.approx(1.0) and accuracies[0] != 0.5
    with pytest.raises(ConfigError, match="option 'data': got 'builtin:addition' with target=states"):
        train("reward", {**run, "data": "builtin:addition"})
    with pytest.raises(ConfigError, match="'margin' and 'center_coef' apply to preferences only"):
        train("reward", {**run, "margin": 0.5})


def test_reward_resumes_from_its_checkpoint(tmp_path):
    """The head travels with the checkpoint: resuming from step 2 of a 4-step run (its
    step-4 checkpoint removed) reproduces the run's losses exactly."""
    import shutil

    run = {**QUICK, "steps": 4, "save_every": 2, "output_dir": str(tmp_path)}
    whole = train("reward", run)
    shutil.rmtree(whole["checkpoint"])
    resumed = train("reward", {**run, "resume": True})
    assert resumed["checkpoint"] == whole["checkpoint"]
    assert _losses(resumed) == _losses(whole) and len(_losses(whole)) == 4


def test_reward_takes_the_warm_starts_backbone(tmp_path):
    """The warm start's SFT backbone goes into the reward model; its LM head does not,
    and the score head starts at zero. With a zero head the backbone's first gradient
    is exactly zero, so after one step the backbone still equals the warm start's."""
    from safetensors.torch import load_file

    from fastpo.engine.models import load_causal_lm

    summary = train("reward", {**QUICK, "warm_start_steps": 3, "steps": 1, "head_init_std": 0, "lm_coef": 0,
                               "output_dir": str(tmp_path)})
    assert _losses(summary)[0] == pytest.approx(math.log(2), abs=1e-6)
    warm = load_file(tmp_path / "warm_start/checkpoints/step-00000003/model/model.safetensors")
    trained = load_file(summary["checkpoint"] + "/model/model.safetensors")
    backbone = [key for key in warm if key.startswith("model.")]
    assert backbone and sorted(backbone) == sorted(key for key in trained if key != "score.weight")
    for key in backbone:
        torch.testing.assert_close(trained[key], warm[key], rtol=0, atol=0)
    untrained = load_causal_lm("builtin:tiny", seed=0)[0].state_dict()
    assert not torch.equal(warm["model.embed_tokens.weight"], untrained["model.embed_tokens.weight"])
    assert trained["score.weight"].abs().sum() > 0  # the head, and only the head, moved


@pytest.fixture
def qwen_checkpoint(tmp_path):
    """A Qwen2-style causal LM built from a config here (tied LM head, no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastpo.engine.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    return str(tmp_path / "qwen")


@pytest.mark.parametrize(
    "algorithm, options, first_loss",
    [  # (1/(2*0.1))**2; 1 - sigmoid(0); -log sigmoid(0) with a zero head
        ("ipo", {}, 25.0), ("kto", {}, 0.5), ("reward", {"head_init_std": 0, "lm_coef": 0}, math.log(2)),
    ],
)
def test_a_local_causal_checkpoint_trains(tmp_path, qwen_checkpoint, algorithm, options, first_loss):
    summary = train(algorithm, {**QUICK, "steps": 2, "model": qwen_checkpoint, "output_dir": str(tmp_path / "run"),
                                **options})
    assert summary["status"] == "completed" and _losses(summary)[0] == pytest.approx(first_loss, abs=1e-4)
    assert summary["preference_accuracy_before"] == 0.5


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """builtin:tiny saved as a causal LM folder (an LM head of its own, not tied)."""
    from fastpo.engine.models import load_causal_lm

    model, tokenizer = load_causal_lm("builtin:tiny", seed=3)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


@pytest.mark.parametrize("checkpoint, schema", [("tiny_checkpoint", "ranked"), ("qwen_checkpoint", "pairwise")])
def test_reward_lm_term_is_the_chosen_nll_under_the_starting_lm_head(tmp_path, request, checkpoint, schema):
    """With a zero score head the first loss is the ranking term of tied scores (log 2)
    plus lm_coef times the chosen (best) response's mean NLL per token under the causal
    checkpoint's own LM head (tied for Qwen), recomputed here in float64 from its logits.
    Every row is the same, so the first micro-batch is known."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from fastpo.engine.forward import IGNORE_INDEX, encode_responses
    from fastpo.engine.tokenizer import build_char_tokenizer

    folder = request.getfixturevalue(checkpoint)
    prompt, best, worse = "17+25=", "42", "45"
    row = {"prompt": prompt, "chosen": best, "rejected": worse} if schema == "pairwise" else \
        {"prompt": prompt, "responses": [best, worse, "51"]}
    data = _write(tmp_path / "rows.jsonl", [row] * 8)
    summary = train("reward", {**QUICK, "steps": 1, "model": folder, "data": data, "eval_data": data,
                               "head_init_std": 0, "lm_coef": 0.7, "output_dir": str(tmp_path / "run")})
    causal = AutoModelForCausalLM.from_pretrained(folder).double()
    batch = encode_responses(build_char_tokenizer(), [prompt], [best], 64)
    with torch.no_grad():
        logits = causal(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll = F.cross_entropy(logits[0], batch["labels"][0], ignore_index=IGNORE_INDEX)  # mean over response tokens
    assert _losses(summary)[0] == pytest.approx(math.log(2) + 0.7 * float(nll), abs=1e-5)
    # A start with no LM head (the random built-in model) has no term: the loss is log 2.
    plain = train("reward", {**QUICK, "steps": 1, "data": data, "head_init_std": 0, "lm_coef": 0.7,
                             "output_dir": str(tmp_path / "plain")})
    assert _losses(plain)[0] == pytest.approx(math.log(2), abs=1e-6)


def test_reward_keeps_the_head_of_a_reward_checkpoint(tmp_path):
    """Training a reward model from a reward checkpoint starts from its trained head (no
    new head is drawn, whatever head_init_std says)."""
    first = train("reward", {**QUICK, "steps": 3, "head_init_std": 0, "output_dir": str(tmp_path / "first")})
    again = train("reward", {**QUICK, "steps": 1, "model": first["checkpoint"] + "/model",
                             "output_dir": str(tmp_path / "again")})
    assert again["preference_accuracy_before"] == first["preference_accuracy_after"]
    assert _losses(again)[0] != pytest.approx(math.log(2), abs=1e-6)  # the scores are no longer all 0
