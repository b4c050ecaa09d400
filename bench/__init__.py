"""fastpo.bench: the benchmark suite (``python -m fastpo.bench``) and its focused scripts."""

from fastpo.engine._shadowing import hide_repository_kernels

# Run from the repository root (``make bench``), the folder kernels/ would be found as a
# top-level ``kernels`` by transformers' probe, which TRL's import then trips on; see
# engine/_shadowing.py. Before any benchmark module imports transformers or TRL.
hide_repository_kernels()
