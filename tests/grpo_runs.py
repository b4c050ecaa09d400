"""GRPO run settings and a recorder of its rollouts, shared by the engine's and the reasoning
commands' tests."""

# A GRPO run of seconds: 4 prompts x 4 completions of at most 4 tokens, one step a rollout.
QUICK = {"batch_size": 16, "grad_accum_steps": 1, "prompts_per_rollout": 4, "num_generations": 4,
         "warmup_steps": 1, "log_every": 1, "eval_every": 0, "warm_start_steps": 0, "max_new_tokens": 4}
# The smallest tree rollout: one initial sample, one branch point, two branches.
TREE = {"rollout": "tree", "tree_initial": 1, "tree_points": 1, "tree_branches": 2}


def record_rollouts(monkeypatch) -> list[dict]:
    """The tensors grpo hands to ``split_micro_batches`` (a rollout's, advantages
    included), one dict per call, appended to the returned list as grpo trains."""
    from fastpo.engine.algorithms import grpo

    seen = []
    split = grpo.split_micro_batches

    def recording_split(tensors, *args):
        seen.append(tensors)
        return split(tensors, *args)

    monkeypatch.setattr(grpo, "split_micro_batches", recording_split)
    return seen
