"""Reward callables for the online-algorithm tests, importable as ``online_rewards:NAME``
(pytest puts tests/ on the path)."""

import os
import signal

calls = {"sigterm_on": None, "count": 0, "fields": None}


def digit_share(prompts, completions, **fields):
    """Share of a completion's characters that are digits (0 for an empty one): a dense
    reward that a random model can climb."""
    calls["fields"] = fields
    return [sum(ch.isdigit() for ch in c) / len(c) if c else 0.0 for c in completions]


def digit_share_with_sigterm(prompts, completions, **fields):
    """``digit_share`` that sends SIGTERM to this process on call number
    ``calls["sigterm_on"]`` (counted from 1)."""
    calls["count"] += 1
    if calls["count"] == calls["sigterm_on"]:
        os.kill(os.getpid(), signal.SIGTERM)
    return digit_share(prompts, completions, **fields)
