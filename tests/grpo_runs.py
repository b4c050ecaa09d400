"""GRPO run settings shared by the engine's and the reasoning commands' tests."""

# A GRPO run of seconds: 4 prompts x 4 completions of at most 4 tokens, one step a rollout.
QUICK = {"batch_size": 16, "grad_accum_steps": 1, "prompts_per_rollout": 4, "num_generations": 4,
         "warmup_steps": 1, "log_every": 1, "eval_every": 0, "warm_start_steps": 0, "max_new_tokens": 4}
# The smallest tree rollout: one initial sample, one branch point, two branches.
TREE = {"rollout": "tree", "tree_initial": 1, "tree_points": 1, "tree_branches": 2}
