"""Batches sized by memory (rlp_core.memory, spec.batchMemory): the estimates on hand-computed numbers, a batch
cut into micro-batches training exactly as the whole batch, and the budget reaching the phases."""

from __future__ import annotations

import pytest
import torch

from rlp_core.data import PreferencePair
from rlp_core.memory import CPU_DEFAULT_BUDGET, DecoderShape, budget_bytes, chunks, parse_budget, rows_that_fit
from rlp_core.models import build_tiny_policy, load_reward_model, save_model, train_tokenizer
from rlp_core.runner import run_local
from rlp_core.spec import TinyModel, Training, parse_run
from rlp_core.supervised import fit, reward_loss, weighted_pairs, whole

CPU = torch.device("cpu")


def test_rows_that_fit_and_chunks_on_hand_numbers():
    assert rows_that_fit(1000, 300, 64) == 3
    assert rows_that_fit(1000, 300, 2) == 2  # never more than the batch asks for
    assert rows_that_fit(100, 300, 64) == 1  # a row over the budget still runs, alone
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_the_budget_is_a_kubernetes_quantity_with_a_cpu_default():
    assert parse_budget("512Mi") == 512 * 2**20
    assert parse_budget("1.5e9") == 1_500_000_000
    assert budget_bytes("2Gi", CPU) == 2 * 2**30
    assert budget_bytes(None, CPU) == CPU_DEFAULT_BUDGET == 2**30


def test_decoder_row_estimates_on_hand_numbers():
    shape = DecoderShape(layers=2, hidden=8, intermediate=16, heads=2, kv_width=4, vocab=10, element_bytes=4)
    # a layer's forward transients, 3 tokens: 4 B x (3 x (5*8 + 2*4 + 3*16) + 2 x 2 heads x 3 x 3) = 4 x 324
    assert shape.inference_row(3) == 1296
    assert shape.inference_row(3, logit_positions=2) == 1296 + 2 * 4 * 2 * 10
    # generation: KV cache 2 x 2 layers x 4 x 3 tokens x 4 B = 192, the prefill's 1296, 3 fp32 copies of 10 logits
    assert shape.generation_row(3) == 192 + 1296 + 120
    # training keeps per layer 4 B x (3 x (10*8 + 2*4 + 4*16) + 36) = 1968, for both layers
    assert shape.training_row(3) == 2 * 1968
    # checkpointed: each layer's input (2 x 3 x 8 x 4 B) and one layer recomputed
    assert shape.training_row(3, checkpointing=True) == 192 + 1968


def test_the_shape_is_read_from_the_models_config():
    tokenizer = train_tokenizer(["1+2=3", "4+5=9"], 48)
    model = build_tiny_policy(tokenizer, TinyModel(hidden_size=32, num_heads=2, intermediate_size=64, num_layers=3), 0)
    assert DecoderShape.of(model) == DecoderShape(layers=3, hidden=32, intermediate=64, heads=2, kv_width=32,
                                                   vocab=len(tokenizer), element_bytes=4)


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory):
    texts = [f"{a}+{b}={a + b}" for a in range(10) for b in range(10)]
    tokenizer = train_tokenizer(texts, 64)
    path = tmp_path_factory.mktemp("rm")
    save_model(build_tiny_policy(tokenizer, TinyModel(hidden_size=32, num_heads=2, intermediate_size=64), 0), tokenizer, path)
    return path


def test_micro_batches_train_the_reward_model_as_the_whole_batch_does(tiny_rm_dir):
    """Pairs of unequal weight, 7 a batch, cut 3 + 3 + 1: the gradient accumulated with each micro-batch weighing its
    share of the pair weights is the batch's (a share by pair count would differ: the weights differ). Compared after
    one step, whose gradient stays in .grad; later steps' weights would differ by more than rounding only where
    Adam divides a near-zero gradient by its near-zero running scale."""
    from rlp_core.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_rm_dir)
    batch = [PreferencePair(prompt=f"{a}+{b}=", chosen=str(a + b), rejected=str(a + b + 1), weight=1 + (a % 3))
             for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (0, 5), (6, 3)]]
    training = Training(learning_rate=0.01, warmup_ratio=0.0, max_grad_norm=1e9)

    def one_step(micro_batches):
        torch.manual_seed(0)
        model = load_reward_model(tiny_rm_dir)
        history = fit(list(model.parameters()), [batch], reward_loss(model, tokenizer, 32), training,
                      micro_batches=micro_batches)
        return {name: p.grad for name, p in model.named_parameters()}, history[0]

    whole_grads, whole_stats = one_step(whole)
    micro_grads, micro_stats = one_step(weighted_pairs(3))
    assert [len(part) for part, _ in weighted_pairs(3)(batch)] == [3, 3, 1]
    for name, grad in whole_grads.items():
        torch.testing.assert_close(micro_grads[name], grad, rtol=1e-4, atol=1e-7)
    assert micro_stats["tokens"] == whole_stats["tokens"]
    assert micro_stats["reward_loss"] == pytest.approx(whole_stats["reward_loss"], rel=1e-5)


def test_the_budget_reaches_generation_reward_training_refinement_and_evaluation(tmp_path):
    """With a budget a few rows wide, generate and evaluate sample in chunks of that many, the reward phase trains in
    micro-batches and refinement checkpoints its gradients; the default leaves the tiny model's batches whole."""

    def phases(batch_memory: str | None) -> dict[str, dict]:
        spec = {"seed": 0, "rounds": 1,
                "policy": {"sft": {"tiny": {"maxPositions": 32}, "training": {"epochs": 0.1, "batchSize": 64}}},
                "rewardModel": {"humanPreferences": "builtin://arith/preferences?n=200",
                                "training": {"epochs": 1, "batchSize": 32}},
                "generation": {"samplesPerPrompt": 2, "maxPrompts": 16, "maxNewTokens": 4, "batchSize": 32},
                "rewardLearning": {"strategy": "rlp-uml", "uml": {"training": {"batchSize": 8}}},
                "optimization": {"steps": 1, "rolloutBatchSize": 8, "miniBatchSize": 8, "maxNewTokens": 4},
                "evaluation": {"prompts": "builtin://arith/eval?n=16", "judge": "builtin://arith", "maxNewTokens": 4}}
        if batch_memory is not None:
            spec["batchMemory"] = batch_memory
        run = parse_run({"metadata": {"name": "budget"}, "spec": spec})
        label = batch_memory or "default"
        report = run_local(run, store_uri=f"file://{tmp_path}/{label}", cache_dir=tmp_path / f"cache-{label}",
                           report_dir=tmp_path / f"report-{label}")
        return {r.phase: r.manifest.metrics for r in report.results if r.manifest is not None}

    default, tight = phases(None), phases("1Mi")
    assert default["generate"]["chunk_rows"] == 32 and default["reward"]["micro_batch_pairs"] == 32
    assert default["evaluate"]["chunk_rows"] == 16
    assert 1 <= tight["generate"]["chunk_rows"] < 32
    assert 1 <= tight["reward"]["micro_batch_pairs"] < 32
    assert 1 <= tight["evaluate"]["chunk_rows"] < 16
    assert (default["refine"]["gradient_checkpointing"], tight["refine"]["gradient_checkpointing"]) == (False, True)
    assert tight["generate"]["samples"] == default["generate"]["samples"] == 32
    assert tight["reward"]["steps"] == default["reward"]["steps"]
