"""token_logprobs and linear_token_logprobs with ``process_group=`` (a vocabulary-sharded
LM head) under ``torchrun --nproc-per-node 2`` with gloo on the CPU, against the
unsharded op on the same inputs; the checks run in tests/vocab_parallel_worker.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpo.kernels import token_logprobs

WORKER = Path(__file__).with_name("vocab_parallel_worker.py")


def test_two_vocabulary_shards_match_the_unsharded_op():
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"},
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-5000:]


def test_process_group_needs_torch_distributed():
    logits, targets = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        token_logprobs(logits, targets, process_group=object())
