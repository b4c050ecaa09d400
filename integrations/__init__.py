"""fastpo inside the trainers people already run: one module per trainer family.

* ``fastpo.integrations.trl``: ``enable()`` makes TRL's fused LM head (SFT, DPO, GRPO,
  RLOO, KTO) run on ``fastpo.kernels.linear_token_logprobs``.
* ``fastpo.integrations.verl``: fastpo's policy losses and advantage estimators in verl's
  registries.
* ``fastpo.integrations.openrlhf``: OpenRLHF's loss modules computed by fastpo.

Each module imports its trainer only when called, so fastpo imports without any of
them, and checks the installed version against the range it was tested with.
"""
