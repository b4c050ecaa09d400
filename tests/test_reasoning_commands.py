"""The reasoning task from the command line: ``data=builtin:countdown`` in the engine (the
task's option defaults, tokenizer, verifier and warm start), ``fastpo reason`` and
``fastpo grpo rollout=tree``."""

import json

import pytest
import torch
from cli_checks import fails_in_one_line

from fastpo.engine import cli, train
from fastpo.engine.algorithms import _common
from fastpo.engine.config import ConfigError, GRPOConfig, SFTConfig, format_help, from_dict, load_config
from fastpo.engine.countdown import CountdownTask, moves
from fastpo.engine.forward import generation_pad_id, greedy_completions
from fastpo.engine.loop import STATE_FILE
from fastpo.engine.models import load_causal_lm
from fastpo.engine.rollout import Rollout
from fastpo.engine.tree_rollout import tree_advantages
from fastpo.engine.warm_start import settings
from grpo_runs import QUICK, TREE, record_rollouts

SFT_STEPS = 150  # countdown SFT, batch 16: enough for the chain's format (100 gave 34% well formed)


def _records(path):
    records = [json.loads(line) for line in open(path)]
    for record in records:
        record.pop("step_time_s")
    return records


# ---------------------------------------------------------------- the task in the engine


def test_countdown_sets_its_defaults_and_the_user_still_wins():
    grpo = load_config("grpo", overrides=["data=builtin:countdown"])
    assert (grpo.max_new_tokens, grpo.max_length, grpo.rewards) == (128, 160, ["builtin:countdown"])
    assert load_config("grpo", overrides=["data=builtin:countdown", "max_new_tokens=96"]).max_new_tokens == 96
    countdown_sft = from_dict(SFTConfig, {"data": "builtin:countdown"})
    assert countdown_sft.max_length == 160 and countdown_sft.packing and not from_dict(SFTConfig, {}).packing
    # The order of the overrides does not matter: the task's defaults come first.
    assert load_config("grpo", overrides=["max_length=200", "data=builtin:countdown"]).max_length == 200
    plain = load_config("grpo")
    assert (plain.max_new_tokens, plain.max_length, plain.rewards) == (8, 64, ["builtin:addition"])
    assert "data=builtin:countdown changes the defaults: max_new_tokens=128 max_length=160" in format_help("grpo")
    countdown_grpo = load_config("grpo", overrides=["data=builtin:countdown"])
    assert countdown_grpo.steps == 100 and countdown_grpo.learning_rate == 1e-4
    # Its tree: four whole chains, each one's answer line resampled once; flat stays the rollout.
    tree = (countdown_grpo.tree_split, countdown_grpo.tree_initial, countdown_grpo.tree_points,
            countdown_grpo.tree_branches)
    assert countdown_grpo.rollout == "flat" and tree == ("last_line", 4, 4, 1)
    assert (plain.tree_split, plain.tree_initial, plain.tree_points, plain.tree_branches) == ("entropy", 2, 3, 2)
    with pytest.raises(ConfigError, match="option 'rewards': got 'builtin:addition'.*use builtin:countdown"):
        from_dict(GRPOConfig, {"data": "builtin:countdown", "rewards": ["builtin:addition"]})


@pytest.mark.parametrize("args, names", [
    (["grpo", "data=builtin:countdown", "rewards=builtin:addition"], ["option 'rewards'", "builtin:countdown"]),
    (["grpo", "data=builtin:chess"], ["option 'data'", "builtin:chess", "builtin:countdown"]),
    (["grpo", "rollout=forest"], ["option 'rollout'", "'forest'", "flat, tree"]),
    (["grpo", "rollout=tree", "tree_initial=9"], ["option 'tree_initial'", "9", "num_generations=8"]),
    (["grpo", "rollout=tree", "advantage=rloo"], ["option 'advantage'", "'rloo'", "rollout=tree"]),
    (["grpo", "rollout=tree", "tree_split=word"], ["option 'tree_split'", "'word'", "entropy, line"]),
    (["reason", "strategies=cot,magic"], ["option 'strategies'", "'magic'", "tot_bfs"]),
    (["reason", "strategies=cot,cot"], ["option 'strategies'", "twice"]),
    (["reason", "value=oracle"], ["option 'value'", "'oracle'", "self_checked"]),
    (["reason", "value=head"], ["option 'value_model'", "none", "value=head"]),
    (["reason", "value_model=runs/reward"], ["option 'value_model'", "'runs/reward'", "value=self_checked"]),
    (["reason", "model=builtin:tiny", "value=head", "value_model=no/such/run"],
     ["option 'value_model'", "no/such/run", "no such folder"]),
    (["reason", "threshold=2"], ["option 'threshold'", "2", "[0, 1]"]),
    (["reason", "breadth=0"], ["option 'breadth'", "0", "> 0"]),
    (["reason", "data=builtin:addition"], ["option 'data'", "builtin:countdown"]),
    (["reason", "model=no/such/run"], ["option 'model'", "no/such/run", "no such folder"]),
    (["reason", "model=builtin:tiny", "problems=999"], ["option 'problems'", "999", "held-out problems"]),
    (["reason", "steps=3"], ["unknown option 'steps'"]),
])
def test_bad_options_fail_in_one_line(args, names, tmp_path, capsys):
    # fastpo reason makes no run folder: it has no output_dir
    line = fails_in_one_line(args, capsys, run_dir=None if args[0] == "reason" else tmp_path / "run")
    for name in names:
        assert name in line, (name, line)


def test_exact_match_checks_countdown_chains_with_the_verifier(monkeypatch):
    """Any correct chain counts, not only the reference's: the verifier counts 3 of these 4
    (a comparison with the reference would count 2 at most)."""
    task = CountdownTask()
    rows = task.rows("prompt", 3, "heldout")
    numbers, target = tuple(rows[1]["numbers"]), rows[1]["target"]
    other = next((steps for steps in _solutions(numbers, target)
                  if task.chain(numbers, target, steps) != rows[1]["completion"]), None)
    assert other is not None, "the problem has a single solution chain: pick another"
    rows.append(rows[0])
    completions = [rows[0]["completion"], task.chain(numbers, target, other),
                   rows[2]["completion"].replace("answer: ", "answer: 1+"), rows[0]["completion"]]
    seen = {}

    def greedy(model, tokenizer, prompts, max_new_tokens, stop_strings=()):
        seen["budget"] = max_new_tokens
        return completions

    monkeypatch.setattr(_common, "greedy_completions", greedy)
    _, tokenizer = load_causal_lm("builtin:tiny", characters=CountdownTask.characters)
    assert _common.exact_match_accuracy(None, tokenizer, rows) == 0.75
    assert seen["budget"] == 128  # the task's completion budget, above every reference's length


def test_greedy_completions_are_cut_at_the_stop_strings_and_exact_match_passes_them_on():
    """An online run's samples end at its stop strings; its held-out completions must too,
    or text after a stop makes a right chain wrong."""
    rows = CountdownTask().rows("prompt", 2, "heldout")
    _, tokenizer = load_causal_lm("builtin:tiny", characters=CountdownTask.characters)
    continued = [tokenizer.encode(r["completion"] + "  +1", add_special_tokens=False) for r in rows]

    class Writer(torch.nn.Module):  # greedily "writes" each row's chain, then text past a stop
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **options):
            width = max(len(ids) for ids in continued)
            tail = [ids + [generation_pad_id(tokenizer)] * (width - len(ids)) for ids in continued]
            return torch.cat([input_ids, torch.tensor(tail)], dim=1)

    prompts = [r["prompt"] for r in rows]
    assert greedy_completions(Writer(), tokenizer, prompts, 128) == [r["completion"] + "  +1" for r in rows]
    assert greedy_completions(Writer(), tokenizer, prompts, 128, stop_strings=["  "]) == [r["completion"] for r in rows]
    assert _common.exact_match_accuracy(Writer(), tokenizer, rows) == 0.0
    assert _common.exact_match_accuracy(Writer(), tokenizer, rows, ["  "]) == 1.0


def _solutions(numbers, target):
    """The chains of steps from ``numbers`` that end at ``target``, depth first over ``moves``."""
    if len(numbers) == 1:
        if numbers[0] == target:
            yield []
        return
    for step in moves(numbers):
        for rest in _solutions(step.left, target):
            yield [step, *rest]


def test_countdown_models_and_warm_starts_are_the_tasks_own(tmp_path):
    """A built-in model on countdown writes '*' and '/' (no <unk>), and its warm start is
    keyed by the task, apart from the addition one."""
    countdown = from_dict(GRPOConfig, {"data": "builtin:countdown", "warm_start_steps": 50})
    addition = from_dict(GRPOConfig, {"warm_start_steps": 50})
    keyed = settings(countdown, 50)
    assert keyed["data"] == "builtin:countdown" and "*" in keyed["vocabulary"] and "/" in keyed["vocabulary"]
    assert settings(addition, 50)["data"] == "builtin:addition" and "*" not in settings(addition, 50)["vocabulary"]
    assert keyed["packing"] and not settings(addition, 50)["packing"]  # the task's SFT default, packed chains
    _, model, tokenizer, _ = _common.prepare_run("grpo", from_dict(GRPOConfig, {
        "data": "builtin:countdown", "warm_start_steps": 0, "output_dir": str(tmp_path)}))
    ids = tokenizer.encode("13 * 2 / 1", add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids and model.config.vocab_size == len(tokenizer) == 81


# ---------------------------------------------------------------- fastpo reason


def test_model_option_takes_a_run_a_checkpoint_or_a_model_folder(tmp_path):
    from fastpo.engine.reasoning import _model_folder

    model, tokenizer = load_causal_lm("builtin:tiny", characters=CountdownTask.characters)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    model.save_pretrained(checkpoint / "model")
    (checkpoint / STATE_FILE).write_bytes(b"")
    earlier = tmp_path / "run" / "checkpoints" / "step-00000001"
    model.save_pretrained(earlier / "model")
    (earlier / STATE_FILE).write_bytes(b"")
    want = str(checkpoint / "model")
    assert _model_folder(str(tmp_path / "run")) == want
    assert _model_folder(str(checkpoint)) == want
    assert _model_folder(want) == want
    with pytest.raises(ConfigError, match="option 'model'.*a folder without a model or checkpoints"):
        _model_folder(str(tmp_path))


def test_a_value_model_without_a_trained_score_head_is_refused(tmp_path, capsys):
    model, tokenizer = load_causal_lm("builtin:tiny", characters=CountdownTask.characters)
    model.save_pretrained(tmp_path / "causal")
    tokenizer.save_pretrained(tmp_path / "causal")
    capsys.readouterr()
    for value_model in (tmp_path / "causal", "builtin:tiny"):
        line = fails_in_one_line(["reason", "model=builtin:tiny", "value=head", f"value_model={value_model}"], capsys)
        assert "option 'value_model'" in line and "no trained score head" in line and "target=states" in line


def test_reason_reports_each_strategy_as_a_json_line_and_a_table(tmp_path, capsys):
    out = tmp_path / "reports.jsonl"
    args = ["reason", "model=builtin:tiny", "problems=2", "samples=2", "breadth=2", "proposals=2", "node_budget=2",
            "max_line_tokens=6", "max_chain_tokens=12", "value=self_checked", "threads=1", f"output={out}"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    reports = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["strategy"] for r in reports] == ["direct", "cot", "self_consistency", "tot_bfs", "tot_dfs"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == reports
    for report in reports:
        assert report["problems"] == 2 and 0.0 <= report["accuracy"] <= 1.0 and report["model_calls"] >= 1
        assert report["generated_tokens"] > 0 and report["wall_seconds"] > 0
    by_name = {r["strategy"]: r for r in reports}
    # One greedy chain per problem, at most max_chain_tokens; self_consistency samples two.
    assert by_name["cot"]["model_calls"] == 1 and by_name["cot"]["generated_tokens"] <= 12
    assert by_name["self_consistency"]["generated_tokens"] > by_name["cot"]["generated_tokens"]
    assert "| tot_dfs | self_checked | 2 |" in captured.err
    # A learned value head: a value model's run folder (here an untrained one) searches too.
    value_run = train("reward", {"data": "builtin:countdown", "target": "states", "model": "builtin:tiny",
                                 "warm_start_steps": 0, "steps": 1, "batch_size": 4, "eval_every": 0,
                                 "output_dir": str(tmp_path / "value")})
    capsys.readouterr()
    assert cli.main(args[:-1] + ["strategies=tot_bfs", "value=head_checked",
                                 f"value_model={value_run['run_dir']}"]) == 0
    headed = json.loads(capsys.readouterr().out)
    assert headed["value"] == "head_checked" and headed["problems"] == 2 and headed["model_calls"] >= 1
    # The seed is reset before each strategy: the same run reports the same numbers.
    assert cli.main(args[:-1] + ["strategies=tot_bfs"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in again.items() if k != "wall_seconds"} == \
        {k: v for k, v in by_name["tot_bfs"].items() if k != "wall_seconds"}


# ---------------------------------------------------------------- grpo rollout=tree


def test_grpo_tree_rollout_trains_on_treerl_advantages(tmp_path, monkeypatch):
    seen = record_rollouts(monkeypatch)
    summary = train("grpo", {**QUICK, **TREE, "steps": 2, "max_new_tokens": 6, "rewards": "online_rewards:digit_share",
                             "output_dir": str(tmp_path)})
    assert summary["status"] == "completed"
    for tensors in seen:
        mask = tensors["mask"]
        rollout = Rollout([""] * len(mask), [""] * len(mask), tensors["input_ids"], tensors["attention_mask"],
                          tensors["labels"], tensors["rollout_logprobs"], torch.zeros(len(mask), dtype=torch.bool))
        rewards = tensors["metric/reward"].view(-1, 4)
        scaled = (rewards / (rewards.std(dim=1, keepdim=True) + 1e-4)).flatten()  # scale_rewards=group
        torch.testing.assert_close(tensors["advantages"], tree_advantages(rollout, scaled, 4))
        # Each tree: one chain from the root, then 3 leaves that branch off it and share
        # its prefix, so fewer tokens are decoded than the leaves hold.
        assert tensors["advantages"].shape == mask.shape
        generated, lengths = tensors["metric/generated_tokens"], mask.sum(-1).float()
        assert (generated <= lengths).all() and generated.sum() < lengths.sum()
    records = _records(summary["metrics_file"])
    assert all(0 < r["generated_tokens"] <= r["completion_length"] for r in records)


# ---------------------------------------------------------------- countdown end to end


@pytest.mark.slow
def test_countdown_sft_then_grpo_writes_chains_and_earns_the_reward(tmp_path):
    """sft then grpo on builtin:countdown, CI-sized: SFT teaches the chain's format (a
    random model writes none), and GRPO's samples from it earn the task's reward."""
    task = CountdownTask()
    heldout = tmp_path / "heldout.jsonl"  # 8 problems: a cheap held-out evaluation
    heldout.write_text("".join(json.dumps(row) + "\n" for row in task.rows("prompt", 8, "heldout")))
    sft = train("sft", {"data": "builtin:countdown", "steps": SFT_STEPS, "batch_size": 16, "learning_rate": 3e-3,
                        "warmup_steps": 10, "eval_every": 0, "eval_data": str(heldout),
                        "output_dir": str(tmp_path / "sft")})
    model_dir = sft["checkpoint"] + "/model"
    model, tokenizer = load_causal_lm(model_dir)
    rows = task.rows("prompt", 32, "heldout")
    chains = greedy_completions(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens=128)
    well_formed = sum(task.check(row["prompt"], chain).well_formed for row, chain in zip(rows, chains)) / len(rows)
    assert well_formed >= 0.4, well_formed  # a random model writes no well-formed chain
    grpo = train("grpo", {"data": "builtin:countdown", "model": model_dir, "warm_start_steps": 0, "steps": 4,
                          "prompts_per_rollout": 8, "num_generations": 4, "batch_size": 32, "grad_accum_steps": 1,
                          "log_every": 1, "eval_every": 0, "eval_data": str(heldout),
                          "output_dir": str(tmp_path / "grpo")})
    rewards = [r["reward"] for r in _records(grpo["metrics_file"])]
    # Well-formed chains earn format_reward (0.1); a wrong reward source would give 0 or crash.
    assert len(rewards) == 4 and all(0 < r <= 1 for r in rewards), rewards
    assert grpo["heldout_reward_before"] >= 0
