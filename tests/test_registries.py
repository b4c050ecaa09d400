"""The variant registries of fastpo.kernels, and the docs and CONTRIBUTING.md they keep
true: every registered name appears in its docs table, every path and symbol that
CONTRIBUTING.md points to exists, and the kernels package has no import cycle."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch

import fastpo.kernels as kernels
from fastpo.kernels import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    PolicyLossOptions,
)
from fastpo.kernels.registry import Registry, Variant

ROOT = Path(__file__).resolve().parent.parent
REGISTRIES = {
    "POLICY_LOSSES": POLICY_LOSSES,
    "KL_ESTIMATORS": KL_ESTIMATORS,
    "AGGREGATIONS": AGGREGATIONS,
    "ADVANTAGE_ESTIMATORS": ADVANTAGE_ESTIMATORS,
    "PREFERENCE_LOSSES": PREFERENCE_LOSSES,
}
# The docs page whose option table lists each registry's names.
DOCS_TABLES = {
    "POLICY_LOSSES": "docs/rl-losses.md",
    "KL_ESTIMATORS": "docs/rl-losses.md",
    "AGGREGATIONS": "docs/rl-losses.md",
    "ADVANTAGE_ESTIMATORS": "docs/advantages.md",
    "PREFERENCE_LOSSES": "docs/preference.md",
}


@pytest.mark.parametrize("name", list(REGISTRIES))
def test_registry_entries(name):
    registry = REGISTRIES[name]
    assert registry is getattr(kernels, name) and registry.name == name
    names = registry.names()
    assert isinstance(names, tuple) and len(names) == len(set(names)) == len(registry) > 0
    assert [variant.name for variant in registry] == list(names)
    ids = {}
    for variant in registry:
        assert isinstance(variant, Variant) and variant.doc and variant.peers and callable(variant.reference)
        assert registry.get(variant.name) is variant and variant.name in registry
        if variant.kernel_id is not None:  # one id, one formula
            assert ids.setdefault(variant.kernel_id, variant.reference) is variant.reference, variant.name


@pytest.mark.parametrize("name", list(REGISTRIES))
def test_every_registered_name_is_in_its_docs_table(name):
    text = (ROOT / DOCS_TABLES[name]).read_text()
    for variant in REGISTRIES[name]:
        assert re.search(rf"^\| `\"?{re.escape(variant.name)}\"?`", text, re.MULTILINE), (
            f"{variant.name!r} of {name} has no row in {DOCS_TABLES[name]}"
        )


def test_every_policy_loss_option_is_documented():
    text = (ROOT / "docs/rl-losses.md").read_text()
    for field in PolicyLossOptions.field_names():
        assert f"`{field}" in text and f"{field}=" in text, field


def test_unknown_names_are_errors_naming_the_registry_with_a_suggestion():
    with pytest.raises(ValueError, match=r"^kl_kind='k33' is not one of 'k1', 'k2', 'k3', 'abs', 'low_var_kl'.* "
                                         r"\(fastpo.kernels.KL_ESTIMATORS\); did you mean 'k3'\?$"):
        KL_ESTIMATORS.get("k33")
    with pytest.raises(ValueError, match=r"^kind='nope' is not one of .*KL_ESTIMATORS\)$"):
        KL_ESTIMATORS.check("nope", "kind")
    with pytest.raises(ValueError, match=r"^advantage='grpo' is not one of 'group', .*ADVANTAGE_ESTIMATORS"):
        ADVANTAGE_ESTIMATORS.get("grpo")
    with pytest.raises(ValueError, match=r"^loss_type='sigmod' .*PREFERENCE_LOSSES\); did you mean 'sigmoid'"):
        kernels.dpo_loss(torch.zeros(2), torch.zeros(2), loss_type="sigmod")


def test_registration_rules():
    registry = Registry("EXAMPLES", "example")

    @registry.register("a", kernel_id=1, doc="a", peers="p", extra=3)
    def first(x):
        return x

    assert registry.get("a").params["extra"] == 3 and registry.kernel_id("a") == 1
    with pytest.raises(ValueError, match="'a' is already registered"):
        registry.register("a", kernel_id=2, doc="again")(first)
    with pytest.raises(ValueError, match="kernel_id 1 of 'b' is already the id of 'a'"):
        registry.register("b", kernel_id=1, doc="b")(lambda x: -x)
    registry.register("c", kernel_id=None, doc="no kernel")(lambda x: x)
    with pytest.raises(ValueError, match="'c' has no kernel branch"):
        registry.kernel_id("c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        registry.get("a").name = "z"
    with pytest.raises(TypeError):
        registry.get("a").params["extra"] = 4


def test_contributing_points_to_what_exists():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    for path in set(re.findall(r"\b((?:kernels|tests|bench|csrc|docs|engine)/[\w./-]+\.(?:py|md|cpp|cu|h|sh))", text)):
        assert (ROOT / path).exists(), path
    symbols = {
        "kernels/policy.py": ["_kl_terms", "_policy_loss_fwd_kernel", "_ScaledRowLoss", "KL_ESTIMATORS.register",
                              "tl.static_assert(False"],
        "kernels/_backend.py": ["def dispatch", "NATIVE_OPS", "CPP_DEFAULT_OPS"],
        "kernels/_launch.py": ["def acc_dtype", "def tl_acc_dtype", "def on_tensor_device"],
        "kernels/_validate.py": ["def check_tensor", "def positive_scalar", "def bool_mask"],
        "tests/test_policy_loss.py": ["def reference_kl", "def reference_policy_loss",
                                      "def test_options_validate_at_construction"],
        "tests/test_advantages.py": ["ESTIMATOR_CASES"],
        "tests/test_preference.py": ["def ref_dpo"],
        "tests/conftest.py": ["def backend", "def logprobs_backend"],
        "bench/suite.py": ["Suite("],
    }
    for path, names in symbols.items():
        source = (ROOT / path).read_text()
        for symbol in names:
            assert symbol in source, f"CONTRIBUTING.md names {symbol} of {path}"
    assert "## Adding an algorithm" in text and "make test" in text and "bench/gpu_session.sh" in text


def test_kernels_have_no_import_cycle():
    """Every import between the modules of kernels/, function-level ones included."""
    package = ROOT / "kernels"
    modules = {path.stem: path for path in package.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    edges.add(node.module.split(".")[0])
                else:
                    edges.update(alias.name for alias in node.names)
        graph[name] = edges & set(modules)
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(stack + [node, nxt])}"
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])
