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
    """A judge that knows the answer and favours the first position: the logit of "A" is
    ``correct(A's answer) + bias``, that of "B" is ``correct(B's answer)``."""

    def __init__(self, tokenizer, bias):
        super().__init__()
        self.tokenizer, self.bias = tokenizer, bias
        self.device_anchor = torch.nn.Parameter(torch.zeros(()))
        self.label_ids = [tokenizer.convert_tokens_to_ids(label) for label in rlaif.JUDGE_LABELS]

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            last = int(mask.sum()) - 1
            text = self.tokenizer.decode(ids[: last + 1], skip_special_tokens=True)
            prompt, a, b = re.fullmatch(r"Q: (.*)\? A: (.*) B: (.*)\. Better:", text).groups()
            logits[row, last, self.label_ids[0]] = AdditionTask.verify(prompt, a) + self.bias
            logits[row, last, self.label_ids[1]] = AdditionTask.verify(prompt, b)
        return SimpleNamespace(logits=logits)


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
