"""fastpo.integrations.trl against TRL itself: the real trainers (SFT, DPO, GRPO, RLOO,
KTO) trained twice from the same tiny Qwen2 and seed, with TRL's fused LM head and with
fastpo's, and the fused forward called directly on both."""

import os
import warnings

import pytest
import torch

# no network: every model and tokenizer is built here and loaded from a local folder
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

import fastpo.integrations.trl as fastpo_trl  # noqa: E402
from fastpo import kernels  # noqa: E402

VOCAB = 97


@pytest.fixture(autouse=True)
def _restore_trl():
    """Every test starts and ends with TRL's own head."""
    fastpo_trl.disable()
    yield
    fastpo_trl.disable()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Qwen2 of hidden size 32, one layer, a 97-token vocabulary and an untied head,
    with the character tokenizer of fastpo's engine, saved where the trainers load it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastpo.engine.tokenizer import build_char_tokenizer

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory):
    """A Qwen2-MoE of the same size (4 experts, 2 per token) whose config asks for the
    router logits: TRL's fused forward then adds the load-balancing loss."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from fastpo.engine.tokenizer import build_char_tokenizer

    folder = tmp_path_factory.mktemp("tiny-qwen2-moe")
    tokenizer = build_char_tokenizer()
    config = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=64, tie_word_embeddings=False, output_router_logits=True,
                            router_aux_loss_coef=0.1, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Qwen2MoeForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def load_model(model_dir, head_options=False):
    """The saved model in fp32; with ``head_options`` its LM head gets a bias and its
    config a ``final_logit_softcapping`` and a ``logit_scale``, which TRL's fused head
    reads (Qwen2's own forward ignores them: only the fused path is compared)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if head_options:
        old = model.lm_head
        head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            head.weight.copy_(old.weight)
            head.bias.copy_(torch.linspace(-1.0, 1.0, old.out_features))
        model.lm_head = head
        model.config.final_logit_softcapping = 3.0
        model.config.logit_scale = 0.5
    return model


# ------------------------------------------------------------------ the fused forward


def fused_outputs(model, labels, **call):
    """model(..., fused_lm_head=True) and the gradients of a weighted sum of log-probs
    and entropy with respect to every parameter."""
    out = model(labels=labels, fused_lm_head=True, **call)
    weights = torch.linspace(0.5, 1.5, out.log_probs.numel()).view_as(out.log_probs)
    loss = (out.log_probs * weights).sum() + (out.entropy * weights.flip(-1)).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return out, grads


@pytest.mark.parametrize("case", ["plain", "head_options", "shift_labels", "no_label", "autocast_bf16",
                                  "bf16_head_in_fp32"])
def test_fused_forward_matches_trl(model_dir, case):
    """Every output field and the gradients, stock TRL against fastpo, on the same model.
    ``autocast_bf16``: the head runs in autocast's dtype; ``bf16_head_in_fp32``: a bf16
    model with TRL's cast_lm_head_to_fp32."""
    from trl.trainer.utils import add_fused_lm_head

    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    input_ids = torch.randint(4, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    model = load_model(model_dir, head_options=case == "head_options")
    if case == "bf16_head_in_fp32":
        model = model.to(torch.bfloat16)
    add_fused_lm_head(model, temperature=0.7, outputs=outputs, cast_lm_head_to_fp32=case == "bf16_head_in_fp32")
    with torch.no_grad():  # labels = the argmax at some positions, so that is_top1 is sometimes True
        argmax = model(input_ids=input_ids).logits.argmax(-1)
    labels = input_ids.clone()
    labels[:, 1:4] = argmax[:, :3]
    labels[0, :3] = -100
    labels[2, -2:] = -100
    call = {"input_ids": input_ids}
    if case == "shift_labels":
        call["shift_labels"] = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
        labels = None
    if case == "no_label":
        labels = torch.full_like(labels, -100)

    results = []
    for enabled in (False, True):
        if enabled:
            fastpo_trl.enable()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast_bf16"):
            results.append(fused_outputs(model, labels, **call))
    (stock, stock_grads), (ours, our_grads) = results
    assert type(ours) is type(stock)
    low_precision = case in ("autocast_bf16", "bf16_head_in_fp32")
    # bf16 logits: both round the same products, but not necessarily in the same order
    tol = 2e-2 if case == "autocast_bf16" else 1e-5
    for name in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        ours_v, stock_v = getattr(ours, name), getattr(stock, name)
        assert ours_v.dtype == stock_v.dtype, name
        torch.testing.assert_close(ours_v, stock_v, rtol=tol, atol=tol, msg=name)
    assert torch.equal(ours.label_mask, stock.label_mask)
    if not low_precision:
        assert torch.equal(ours.is_top1, stock.is_top1)
    if case != "no_label":
        assert ours.is_top1.any()
    for ours_g, stock_g in zip(our_grads, stock_grads):
        assert ours_g.dtype == stock_g.dtype
        if low_precision:
            assert (ours_g - stock_g).abs().max() <= 2e-2 * stock_g.abs().max()
        else:
            torch.testing.assert_close(ours_g, stock_g, rtol=1e-4, atol=1e-6)


def test_fused_forward_runs_fastpo_and_not_trl(model_dir, monkeypatch):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import add_fused_lm_head

    calls = {"fastpo": 0}
    real = kernels.linear_token_logprobs

    def counted(hidden, *args, **kwargs):
        calls["fastpo"] += 1
        calls["rows"] = hidden.shape[0]
        return real(hidden, *args, **kwargs)

    def trl_must_not_run(*_, **__):
        raise AssertionError("TRL's _ChunkedLogProbFunction ran while fastpo was enabled")

    monkeypatch.setattr(kernels, "linear_token_logprobs", counted)
    monkeypatch.setattr(ChunkedLogProbFunction, "forward", staticmethod(trl_must_not_run))
    fastpo_trl.enable()
    model = load_model(model_dir)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    input_ids = torch.randint(4, VOCAB, (2, 6))
    labels = input_ids.clone()
    labels[0, :4] = -100
    out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert calls["fastpo"] == 1
    assert calls["rows"] == int((labels[:, 1:] != -100).sum())  # the -100 positions are not projected
    assert out.log_probs.shape == (2, 5) and (out.log_probs[0, :3] == 0).all()


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process (FSDP2's DTensors need a group)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_fsdp2_dtensor_head(model_dir, one_process_group):
    """TRL gathers a DTensor head with full_tensor() before the fused function; with
    fastpo the outputs and the head's gradient (a DTensor) are TRL's."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from trl.trainer.utils import add_fused_lm_head

    model = load_model(model_dir, head_options=True)
    for name in ("weight", "bias"):
        param = getattr(model.lm_head, name)
        setattr(model.lm_head, name, torch.nn.Parameter(distribute_tensor(param.data, one_process_group, [Shard(0)])))
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    input_ids = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    labels = input_ids.clone()
    labels[:, :3] = -100
    results = []
    for enabled in (False, True):
        if enabled:
            fastpo_trl.enable()
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        grad = torch.autograd.grad(out.log_probs.sum() + out.entropy.sum(), model.lm_head.weight)[0]
        assert isinstance(grad, DTensor)
        results.append((out.log_probs, out.entropy, grad.full_tensor()))
    for ours, stock in zip(results[1], results[0]):
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)
    # a DTensor that reaches the fused function itself is refused, naming it
    sharded = model.lm_head.weight
    with pytest.raises(TypeError, match="LM head weight reached the fused head as a DTensor"):
        fastpo_trl._FastpoFusedHead.apply(torch.randn(3, 32), sharded, None, torch.tensor([1, 2, 3]), 1.0, 8)


def test_enable_is_idempotent_and_disable_restores_trl_exactly():
    import trl.trainer.grpo_trainer as grpo_module
    import trl.trainer.utils as utils

    names = ("_ChunkedLogProbFunction", "_use_triton", "add_fused_lm_head")
    before = {name: getattr(utils, name) for name in names}
    before_loss = grpo_module.GRPOTrainer.__dict__["_compute_loss"]
    with pytest.warns(UserWarning, match="RLOOTrainer's loss .* has no fastpo policy_loss equivalent"):
        fastpo_trl.enable(policy_loss=True)
    patched = {name: getattr(utils, name) for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        fastpo_trl.enable(policy_loss=True)
    assert all(getattr(utils, name) is patched[name] for name in names)
    fastpo_trl.enable()  # other arguments: the loss goes back to TRL's, the head stays fastpo's
    assert grpo_module.GRPOTrainer.__dict__["_compute_loss"] is before_loss
    with pytest.warns(UserWarning, match="RLOOTrainer"):
        fastpo_trl.enable(policy_loss=True)
    assert fastpo_trl.is_enabled()
    assert all(getattr(utils, name) is not before[name] for name in names)
    assert grpo_module.add_fused_lm_head is utils.add_fused_lm_head
    assert grpo_module.add_fused_lm_head.__wrapped__ is before["add_fused_lm_head"]  # not wrapped twice
    assert {name: type(getattr(utils, name)) for name in names} == {name: type(v) for name, v in patched.items()}
    fastpo_trl.disable()
    fastpo_trl.disable()
    assert not fastpo_trl.is_enabled()
    assert all(getattr(utils, name) is before[name] for name in names)
    assert grpo_module.add_fused_lm_head is before["add_fused_lm_head"]
    assert grpo_module.GRPOTrainer.__dict__["_compute_loss"] is before_loss


def test_unsupported_version_names_the_installed_one(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.15.2")
    with pytest.raises(RuntimeError, match=r"TRL 1\.15\.2 is installed"):
        fastpo_trl.enable()
    assert not fastpo_trl.is_enabled()


def test_unsupported_options_raise_at_trainer_construction(model_dir, monkeypatch):
    import transformers.integrations.deepspeed as hf_deepspeed
    import trl.trainer.dpo_trainer as dpo_module

    fastpo_trl.enable()
    model = load_model(model_dir)
    model.config.logit_scale = -1.0
    with pytest.raises(ValueError, match=r"logit scale is -1\.0.*disable\(\)"):
        dpo_module.add_fused_lm_head(model)
    monkeypatch.setattr(hf_deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(RuntimeError, match="ZeRO-3 is not supported"):
        dpo_module.add_fused_lm_head(load_model(model_dir))
    with pytest.raises(RuntimeError, match="ZeRO-3 is not supported"):
        fastpo_trl.enable()


# ------------------------------------------------------------------ the trainers

PROMPTS = ["1+2=", "3+4=", "2+5=", "6+1=", "4+4=", "7+2=", "5+3=", "9+0="]


def char_reward(completions, **_):
    """Deterministic, and varied within a group even for an untrained model's samples."""
    return [(sum(map(ord, text)) % 5) / 4 for text in completions]


def dataset(kind):
    from datasets import Dataset

    answers = [str(sum(map(int, p[:-1].split("+")))) for p in PROMPTS]
    if kind in ("grpo", "rloo"):
        rows = [{"prompt": p} for p in PROMPTS]
    elif kind == "sft":
        rows = [{"prompt": p, "completion": a} for p, a in zip(PROMPTS, answers)]
    elif kind == "dpo":
        rows = [{"prompt": p, "chosen": a, "rejected": a[::-1] + "0"} for p, a in zip(PROMPTS, answers)]
    else:  # kto: alternate desirable and undesirable completions
        rows = [{"prompt": p, "completion": a if i % 2 == 0 else a + "1", "label": i % 2 == 0}
                for i, (p, a) in enumerate(zip(PROMPTS, answers))]
    return Dataset.from_list(rows)


def train(kind, model_dir, tmp_path, *, fastpo, head_options=False, lora=False, policy_loss=False, **options):
    """Two optimizer steps of TRL's ``kind`` trainer: (losses logged per step, parameters
    after training, the trainer's other logged metrics)."""
    from transformers import AutoTokenizer

    fastpo_trl.disable()
    if fastpo:
        fastpo_trl.enable(policy_loss=policy_loss)
    config_cls, trainer_cls = {
        "sft": (trl.SFTConfig, trl.SFTTrainer), "dpo": (trl.DPOConfig, trl.DPOTrainer),
        "grpo": (trl.GRPOConfig, trl.GRPOTrainer), "rloo": (trl.RLOOConfig, trl.RLOOTrainer),
        "kto": (trl.KTOConfig, trl.KTOTrainer),
    }[kind]
    args = dict(output_dir=str(tmp_path / f"{kind}-{fastpo}"), max_steps=2, per_device_train_batch_size=4,
                learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                disable_tqdm=True, bf16=False, fp16=False, dataloader_num_workers=0)
    extra = {}
    if kind in ("grpo", "rloo"):
        args.update(num_generations=2, max_completion_length=3)
        extra["reward_funcs"] = char_reward
    args.update(options)
    if lora:
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM")
    model = load_model(model_dir, head_options=head_options)
    trainer = trainer_cls(model=model, args=config_cls(**args), train_dataset=dataset(kind),
                          processing_class=AutoTokenizer.from_pretrained(model_dir), **extra)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    return [entry["loss"] for entry in logs], params, logs


def assert_same_training(stock, ours, metric_keys=()):
    (stock_losses, stock_params, stock_logs), (our_losses, our_params, our_logs) = stock, ours
    assert len(stock_losses) == len(our_losses) == 2
    for a, b in zip(our_losses, stock_losses):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    assert our_params.keys() == stock_params.keys()
    # AdamW's first steps move a weight by about lr whatever the size of its gradient, so
    # rounding-level differences of the tiny gradients (of the head's rows for tokens
    # that never occur) move those weights by up to ~0.5% of lr: 1% of a step is allowed
    atol = 1e-2 * stock_logs[0]["learning_rate"]
    for name in stock_params:
        diff = (our_params[name] - stock_params[name]).abs().max().item()
        assert diff <= atol, f"{name}: parameters differ by {diff:.3g} > {atol:.3g}"
    for key in ("grad_norm", *metric_keys):
        for a, b in zip(our_logs, stock_logs):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("kind,options,head_options,metrics", [
    ("sft", {}, False, ("entropy", "mean_token_accuracy")),
    ("sft", {}, True, ("entropy", "mean_token_accuracy")),
    # use_weighting: WPO, which reads log_sum_sq_probs
    ("dpo", {"use_weighting": True}, False, ("logits/chosen", "logits/rejected", "rewards/chosen")),
    ("kto", {}, True, ("logits/chosen", "rewards/chosen")),
    ("rloo", {"temperature": 0.7}, True, ("entropy",)),
    ("grpo", {"temperature": 0.7, "beta": 0.04}, True, ("entropy", "kl")),
], ids=["sft", "sft-head-options", "dpo-wpo", "kto-head-options", "rloo-head-options", "grpo-head-options"])
def test_trainer_matches_stock(kind, options, head_options, metrics, model_dir, tmp_path):
    """Head options: a bias on the LM head, final_logit_softcapping and a logit scale."""
    stock = train(kind, model_dir, tmp_path, fastpo=False, head_options=head_options, **options)
    ours = train(kind, model_dir, tmp_path, fastpo=True, head_options=head_options, **options)
    assert_same_training(stock, ours, metrics)


def test_moe_auxiliary_loss(moe_model_dir, tmp_path):
    stock = train("sft", moe_model_dir, tmp_path, fastpo=False)
    ours = train("sft", moe_model_dir, tmp_path, fastpo=True)
    assert all(entry["aux_loss"] > 0 for entry in ours[2])
    assert_same_training(stock, ours, ("aux_loss", "entropy"))


def test_grpo_under_lora(model_dir, tmp_path):
    pytest.importorskip("peft")
    # beta > 0: the reference log-probs come from the same model with its adapters disabled
    stock = train("grpo", model_dir, tmp_path, fastpo=False, lora=True, beta=0.04)
    ours = train("grpo", model_dir, tmp_path, fastpo=True, lora=True, beta=0.04)
    assert any("lora" in name for name in ours[1])
    assert_same_training(stock, ours, ("entropy", "kl"))


# ------------------------------------------------------------------ GRPO's loss by fastpo

# Two iterations per generation: the second step's ratio is not 1, and epsilon = 0.002
# makes the clipped branches and their metrics active; two micro-batches per step.
GRPO_LOSS_RUN = dict(num_iterations=2, epsilon=0.002, beta=0.04, gradient_accumulation_steps=2,
                     per_device_train_batch_size=2, learning_rate=3e-3)
CLIP_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max")


@pytest.mark.parametrize("options,metrics", [
    ({"loss_type": "grpo"}, CLIP_METRICS),
    ({"loss_type": "bnpo", "delta": 1.001, "use_bias_correction_kl": False}, CLIP_METRICS),
    ({"loss_type": "dr_grpo", "top_entropy_quantile": 0.5}, CLIP_METRICS),
    ({"loss_type": "dapo", "entropy_coef": 0.05}, (*CLIP_METRICS, "policy_loss")),
    ({"loss_type": "cispo", "epsilon_high": 1.001}, ("kl", "entropy", "cispo_clip_ratio")),
    ({"loss_type": "sapo", "entropy_coef": 0.05}, ("kl", "entropy", "policy_loss")),
    ({"loss_type": "grpo", "importance_sampling_level": "sequence"}, CLIP_METRICS),
], ids=["grpo", "bnpo-delta-no-bias-correction", "dr_grpo-entropy-quantile", "dapo-entropy-bonus", "cispo",
        "sapo-entropy-bonus", "gspo"])
def test_grpo_loss_by_fastpo_policy_loss(options, metrics, model_dir, tmp_path, monkeypatch):
    calls = []
    real = kernels.policy_loss
    monkeypatch.setattr(kernels, "policy_loss", lambda *a, **k: calls.append(k["options"]) or real(*a, **k))
    run = {**GRPO_LOSS_RUN, **options}
    stock = train("grpo", model_dir, tmp_path, fastpo=False, **run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to TRL's loss
        warnings.filterwarnings("ignore", message=".*RLOOTrainer's loss")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        ours = train("grpo", model_dir, tmp_path, fastpo=True, policy_loss=True, **run)
    assert len(calls) == 4 and calls[0].loss_type == options["loss_type"]  # 2 steps x 2 micro-batches
    assert_same_training(stock, ours, metrics)
    if "clip_ratio/region_mean" in metrics:
        assert any(entry["clip_ratio/region_mean"] > 0 for entry in ours[2])


def test_grpo_loss_without_an_equivalent_warns_once_and_runs_trl(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "policy_loss", lambda *a, **k: pytest.fail("fastpo's policy_loss ran"))
    run = {**GRPO_LOSS_RUN, "loss_type": "luspo", "importance_sampling_level": "sequence"}
    stock = train("grpo", model_dir, tmp_path, fastpo=False, **run)
    with pytest.warns(UserWarning, match="loss_type='luspo' has no fastpo policy_loss equivalent") as record:
        ours = train("grpo", model_dir, tmp_path, fastpo=True, policy_loss=True, **run)
    assert sum("luspo" in str(w.message) for w in record) == 1
    assert_same_training(stock, ours, ("kl", "entropy"))
