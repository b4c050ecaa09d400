"""fastpo rlaif: the judge's debiased preference, the labelled pairs and the training
stages they feed, and the built-in judge."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
import yaml

from fastpo.engine.algorithms import rlaif
from fastpo.engine.config import ConfigError, RLAIFConfig
from fastpo.engine.data import load_dataset
from fastpo.engine.models import load_causal_lm
from fastpo.engine.runner import train
from fastpo.engine.task import AdditionTask
from fastpo.engine.tokenizer import build_char_tokenizer

TEMPLATE = RLAIFConfig().judge_template
QUICK = {"warm_start_steps": 0, "num_prompts": 16, "max_new_tokens": 4, "steps": 2, "batch_size": 4,
         "log_every": 1, "eval_every": 0}


class _PositionBiasedJudge(torch.nn.Module):
    """A judge that favours the first position: the logit of "A" is ``good(A's answer) +
    bias``, that of "B" is ``good(B's answer)``. A judge prompt alone: good is correct.
    After a reasoning (``reasoning_sum`` decides the sum its ``generate`` writes, " 12+34=46,
    A: 47, so "): good is equal to the reasoning's sum, right or wrong."""

    def __init__(self, tokenizer, bias, reasoning_sum=lambda a, b: a + b):
        super().__init__()
        self.tokenizer, self.bias, self.reasoning_sum = tokenizer, bias, reasoning_sum
        self.device_anchor = torch.nn.Parameter(torch.zeros(()))
        self.label_ids = [tokenizer.convert_tokens_to_ids(label) for label in rlaif.JUDGE_LABELS]
        self.read_texts = []  # every text whose label was read

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            last = int(mask.sum()) - 1
            text = self.tokenizer.decode(ids[: last + 1], skip_special_tokens=True)
            self.read_texts.append(text)
            prompt, a, b, reasoning = re.fullmatch(r"Q: (.*)\? A: (.*) B: (.*)\. Better:(.*)", text).groups()
            if reasoning:
                written = re.fullmatch(r" \d+\+\d+=(\d+), A: \d+, so ", reasoning).group(1)
                good_a, good_b = float(a == written), float(b == written)
            else:
                good_a, good_b = AdditionTask.verify(prompt, a), AdditionTask.verify(prompt, b)
            logits[row, last, self.label_ids[0]] = good_a + self.bias
            logits[row, last, self.label_ids[1]] = good_b
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        """Greedy decoding as ``forward.greedy_completions`` calls it: the reasoning, then
        a label and eos (which the reading must cut off)."""
        rows = []
        for ids in input_ids:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            x, y, a = re.match(r"Q: (\d+)\+(\d+)=\? A: (\d+)", text).groups()
            reasoning = f" {x}+{y}={self.reasoning_sum(int(x), int(y))}, A: {a}, so A"
            written = self.tokenizer.encode(reasoning, add_special_tokens=False)
            rows.append(ids.tolist() + (written + [self.tokenizer.eos_token_id])[:max_new_tokens])
        width = max(len(row) for row in rows)
        return torch.tensor([row + [self.tokenizer.pad_token_id] * (width - len(row)) for row in rows])


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_swapping_the_order_flips_the_raw_preference_but_not_the_debiased_label():
    tokenizer = build_char_tokenizer()
    judge = _PositionBiasedJudge(tokenizer, bias=2.0)  # the bias outweighs the quality gap of 1
    prompts, right, wrong = ["12+34=", "5+7="], ["46", "12"], ["47", "13"]
    forward, forward_a, forward_b = rlaif.judge_preferences(judge, tokenizer, TEMPLATE, prompts, right, wrong)
    swapped, swapped_a, swapped_b = rlaif.judge_preferences(judge, tokenizer, TEMPLATE, prompts, wrong, right)
    # Raw: the right answer wins when shown first and loses when shown second.
    assert (forward_a > 0.5).all() and (1 - swapped_a < 0.5).all()
    # Debiased: the right answer wins in both orders, with complementary probabilities.
    expected = 0.5 * (_sigmoid(1 + 2.0) + _sigmoid(1 - 2.0))
    torch.testing.assert_close(forward, torch.full((2,), expected))
    torch.testing.assert_close(swapped, 1 - forward)
    torch.testing.assert_close(forward_b, 1 - swapped_a)


def test_a_reasoning_judge_is_read_after_its_reasoning_in_both_orders():
    tokenizer = build_char_tokenizer()
    prompts, right, wrong = ["12+34=", "5+7="], ["46", "12"], ["47", "13"]
    judge = _PositionBiasedJudge(tokenizer, bias=2.0)
    forward, forward_a, _ = rlaif.judge_preferences(judge, tokenizer, TEMPLATE, prompts, right, wrong, reasoning=True)
    swapped, _, _ = rlaif.judge_preferences(judge, tokenizer, TEMPLATE, prompts, wrong, right, reasoning=True)
    # Each order's label is read after that order's reasoning, the eos and the label it wrote cut off.
    assert judge.read_texts[0] == "Q: 12+34=? A: 46 B: 47. Better: 12+34=46, A: 46, so "
    assert judge.read_texts[3] == "Q: 5+7=? A: 13 B: 12. Better: 5+7=12, A: 13, so "
    assert (forward_a > 0.5).all()
    torch.testing.assert_close(forward, torch.full((2,), 0.5 * (_sigmoid(1 + 2.0) + _sigmoid(1 - 2.0))))
    torch.testing.assert_close(swapped, 1 - forward)
    # The label follows the reasoning: a judge whose sum is off by one prefers the near miss.
    misled = _PositionBiasedJudge(tokenizer, bias=0.0, reasoning_sum=lambda a, b: a + b + 1)
    preference, _, _ = rlaif.judge_preferences(misled, tokenizer, TEMPLATE, prompts, right, wrong, reasoning=True)
    assert (preference < 0.5).all()


def test_a_reasoning_that_never_ends_is_cut_at_the_budget_and_ended():
    tokenizer = build_char_tokenizer()
    judge = _PositionBiasedJudge(tokenizer, bias=0.0, reasoning_sum=lambda a, b: 10**40)  # never reaches ", so "
    prompt = TEMPLATE.format(prompt="12+34=", a="46", b="47")
    (reasoned,) = rlaif.reasoned_prompts(judge, tokenizer, [prompt])
    assert reasoned.startswith(prompt) and reasoned.endswith(rlaif.REASONING_END)
    assert len(tokenizer.encode(reasoned[len(prompt) : -len(rlaif.REASONING_END)])) == rlaif._REASONING_MAX_TOKENS


def test_judgement_rows_show_both_orders_with_the_reasoning_before_the_label():
    pair = {"prompt": "12+34=", "chosen": "46", "rejected": "47"}
    assert rlaif.judgement_rows([pair], TEMPLATE, reasoning=True) == [
        {"prompt": "Q: 12+34=? A: 46 B: 47. Better:", "completion": " 12+34=46, A: 46, so A"},
        {"prompt": "Q: 12+34=? A: 47 B: 46. Better:", "completion": " 12+34=46, A: 47, so B"},
    ]
    assert [row["completion"] for row in rlaif.judgement_rows([pair], TEMPLATE)] == ["A", "B"]


@pytest.mark.parametrize("options, reasoning", [
    ({}, True), ({"judge": "some/judge"}, False), ({"judge_reasoning": False}, False),
    ({"judge": "some/judge", "judge_reasoning": True}, True),
])
def test_the_built_in_judge_reasons_and_a_given_one_reads_its_label_directly(options, reasoning):
    assert rlaif.judge_reasoning(RLAIFConfig(**options)) is reasoning


def _judge_folder(tmp_path):
    judge, tokenizer = load_causal_lm("builtin:tiny", seed=1)
    judge.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    return tmp_path / "judge"


def _eval_pairs(tmp_path):
    path = tmp_path / "eval_pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in AdditionTask().preference_pairs(8, "heldout")))
    return str(path)


def test_labelled_pairs_round_trip_through_dpo(tmp_path):
    judge_dir = _judge_folder(tmp_path)
    result = train("rlaif", {**QUICK, "judge": str(judge_dir), "eval_data": _eval_pairs(tmp_path),
                             "output_dir": str(tmp_path / "run")})
    schema, rows = load_dataset(tmp_path / "run" / rlaif.PAIRS_FILE, "dpo")
    assert schema == "pairwise" and len(rows) == result["labelled_pairs"] > 0
    assert result["labelled_pairs"] + result["identical_pairs"] <= QUICK["num_prompts"]
    assert 0 <= result["judge_heldout_accuracy"] <= 1
    # Every label is the judge's debiased preference, whatever order the responses were sampled in.
    judge, tokenizer = load_causal_lm(str(judge_dir))
    preference, _, _ = rlaif.judge_preferences(
        judge, tokenizer, TEMPLATE, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
        [r["rejected"] for r in rows],
    )
    assert (preference > 0.5).all() and all(r["chosen"] != r["rejected"] for r in rows)
    torch.testing.assert_close(preference, torch.tensor([r["judge_probability"] for r in rows]))
    # dpo trained on them from the sampling policy.
    assert result["algorithm"] == "rlaif" and result["steps"] == 2 and math.isfinite(result["loss"])
    assert result["run_dir"] == str(tmp_path / "run" / "dpo")
    dpo_config = yaml.safe_load((tmp_path / "run" / "dpo" / "config.yaml").read_text())
    assert dpo_config["data"] == str(tmp_path / "run" / rlaif.PAIRS_FILE)
    assert dpo_config["model"] == str(tmp_path / "run" / "policy")


def test_reward_then_ppo_trains_on_the_labelled_pairs(tmp_path):
    result = train("rlaif", {**QUICK, "judge": str(_judge_folder(tmp_path)), "then": "reward+ppo", "reward_steps": 2,
                             "output_dir": str(tmp_path / "run")})
    assert result["run_dir"] == str(tmp_path / "run" / "ppo") and result["steps"] == 2
    assert "reward_model_preference_accuracy_after" in result
    ppo_config = yaml.safe_load((tmp_path / "run" / "ppo" / "config.yaml").read_text())
    assert ppo_config["rewards"] == [str(tmp_path / "run" / "reward" / "checkpoints" / "step-00000002" / "model")]


@pytest.mark.parametrize("override, message", [
    ({"judge_template": "Q: {prompt} A: {a}. Better:"}, "option 'judge_template'.*lacks {b}"),
    ({"data": "prompts.jsonl"}, "option 'judge': none trains the built-in judge"),
])
def test_bad_options_name_the_option_and_value(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train("rlaif", {**QUICK, **override, "output_dir": str(tmp_path)})
