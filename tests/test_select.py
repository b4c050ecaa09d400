"""The fixed-shape selections behind top-k/top-p log-probs and Clip-Cov/KL-Cov: the block
selection of the k largest values against torch.topk, and the top-p cut of the torch
backend against Hugging Face's TopPLogitsWarper on rows where the cut is deep and the
values near it are dense (flat rows), the hard case of its histogram."""

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from fastpo.kernels import logprobs as logprobs_module
from fastpo.kernels._select import largest_values


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 4096, 32003])
@pytest.mark.parametrize("values", ["distinct", "ties", "bf16"])
def test_largest_values_equal_torch_topk(n, values):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g)
    if values == "ties":  # many equal values straddle every block boundary and the k-th
        x = torch.randint(0, 4, (5, n), generator=g).float()
    elif values == "bf16":
        x = (x * 4).to(torch.bfloat16).float()
    for k in {1, 2, 8, 50, 104, 700} & set(range(1, n + 1)):
        assert torch.equal(largest_values(x, k), torch.topk(x, k).values), k


@pytest.mark.parametrize(
    "vocab,scale,top_p", [(1000, 0.05, 0.9), (4096, 0.05, 0.5), (4096, 2.0, 0.9), (4096, 8.0, 0.95)]
)
def test_top_p_cut_keeps_exactly_hf_kept_set(vocab, scale, top_p):
    # 64 rows of distinct float32 values: the kept set {z - max >= cut} must be HF's exactly
    g = torch.Generator().manual_seed(vocab)
    z = torch.randn(64, vocab, generator=g) * scale
    shifted = z - z.amax(-1, keepdim=True)
    e = shifted.exp()
    workspace = logprobs_module._cut_workspace(64, vocab, torch.float32, z.device, (None, top_p))
    cut = logprobs_module._chunk_cut(shifted, e, None, top_p, workspace)
    hf = TopPLogitsWarper(top_p=top_p)(None, z.clone()) != float("-inf")
    assert torch.equal(shifted >= cut, hf)
