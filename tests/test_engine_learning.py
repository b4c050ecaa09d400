"""Learning thresholds on the built-in task (2-digit addition, builtin:tiny), measured on
the 200 held-out problems: one SFT run, shared by the module, is both the sft test and
the starting point of the others (``model=<its checkpoint>``, ``warm_start_steps=0``).

* sft: held-out exact match >= ``SFT_EXACT_MATCH``;
* reward: held-out pairwise accuracy (the score ranks the correct answer over a
  corrupted one) >= 0.9;
* dpo, ipo, kto: held-out preference accuracy (the implicit reward ``beta*(lp - lp_ref)``
  ranks the correct answer first) >= ``PREFERENCE_ACCURACY``, from exactly 0.5 before
  training (the policy equals its reference).

The settings were checked on seeds 0, 1 and 2 (numbers in the constants' comments).
"""

import pytest

from fastpo.engine import train

pytestmark = pytest.mark.slow

SFT = {"steps": 600, "batch_size": 64, "learning_rate": 2e-3, "warmup_steps": 20}
SFT_EXACT_MATCH = 0.25
REWARD = {"steps": 800, "batch_size": 32, "learning_rate": 3e-4, "warmup_steps": 20}
DPO = {"steps": 100, "batch_size": 16, "learning_rate": 3e-4, "beta": 0.1}
IPO = {"steps": 100, "batch_size": 16, "learning_rate": 3e-4, "beta": 0.1}
KTO = {"steps": 100, "batch_size": 16, "learning_rate": 3e-4, "beta": 0.1}
PREFERENCE_ACCURACY = 0.8


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return train("sft", {**SFT, "eval_every": 0, "output_dir": str(tmp_path_factory.mktemp("sft"))})


def _from_sft(sft_run, tmp_path, settings):
    return {**settings, "model": sft_run["checkpoint"] + "/model", "warm_start_steps": 0, "eval_every": 0,
            "output_dir": str(tmp_path)}


def test_sft_reaches_its_exact_match(sft_run):
    assert sft_run["heldout_accuracy_before"] == 0.0  # a random model never writes the sum
    assert sft_run["heldout_accuracy_after"] >= SFT_EXACT_MATCH


def test_reward_ranks_held_out_pairs(sft_run, tmp_path):
    summary = train("reward", _from_sft(sft_run, tmp_path, REWARD))
    assert summary["preference_accuracy_before"] == 0.5  # the new head scores every answer 0
    assert summary["preference_accuracy_after"] >= 0.9


@pytest.mark.parametrize("algorithm, settings", [("dpo", DPO), ("ipo", IPO), ("kto", KTO)])
def test_preference_algorithms_rank_held_out_pairs(sft_run, tmp_path, algorithm, settings):
    summary = train(algorithm, _from_sft(sft_run, tmp_path, settings))
    assert summary["preference_accuracy_before"] == 0.5
    assert summary["preference_accuracy_after"] >= PREFERENCE_ACCURACY
    # Starting from the same weights, every run sees the SFT run's exact match first.
    assert summary["heldout_accuracy_before"] == sft_run["heldout_accuracy_after"]
