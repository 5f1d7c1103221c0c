"""Implementation details of sampling and PPO that silently bias RLHF when wrong.

Each test fails on the defect it guards against: top-k left on (rollouts not drawn from the π whose
log-probs enter the ratio and KL), special tokens sampled inside responses (the judge and the RM read
different texts), policy and critic gradients clipped together (the critic's norm shrinks policy steps),
dropout on in the critic (train-mode values differ from the rollout's eval-mode ones).
"""

import pytest
import torch
from transformers import AutoModelForTokenClassification

from rlp_core.models import build_tiny_policy, response_logprobs, suppressed_token_ids, train_tokenizer
from rlp_core.ppo import PPOTrainer, value_forward
from rlp_core.sampling import generation_config, sample_responses
from rlp_core.spec import Optimization, TinyModel
from rlp_core.tasks import TASKS

TASK = TASKS["arith"]
PROMPTS = [r["prompt"] for r in TASK.records("prompts", n=64)]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"{r['prompt']}{r['response']}" for r in TASK.records("demonstrations", n=500)]
    return train_tokenizer(texts, 96)


@pytest.fixture()
def policy(tokenizer):
    """An untrained tiny Llama: near-uniform logits, so any truncation or leak of the vocabulary shows."""
    return build_tiny_policy(tokenizer, TinyModel(hidden_size=32, num_heads=2, intermediate_size=64, max_positions=32), 0)


def test_sampling_logprobs_are_those_of_the_distribution_generate_samples_from(policy, tokenizer):
    """generate()'s processed scores (after every logits processor) give the same log-probs for the sampled
    tokens as the forward pass PPO uses; with transformers' default top-k of 50 they would not."""
    torch.manual_seed(0)
    config = generation_config(tokenizer, max_new_tokens=4)
    enc = tokenizer(PROMPTS[:16], return_tensors="pt", padding=True, add_special_tokens=False)
    out = policy.eval().generate(**enc, generation_config=config, return_dict_in_generate=True, output_scores=True)
    prompt_len = enc["input_ids"].shape[1]
    generated = out.sequences[:, prompt_len:]
    processed = torch.stack(out.scores, dim=1).log_softmax(-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1)
    attention = torch.cat([enc["attention_mask"], torch.ones_like(generated)], dim=1)
    recomputed, _ = response_logprobs(policy, out.sequences, attention, prompt_len, 1.0, suppressed_token_ids(tokenizer))
    alive = torch.ones_like(generated, dtype=torch.bool)  # rows that already ended keep emitting padding
    alive[:, 1:] = (generated[:, :-1] != tokenizer.eos_token_id).cumprod(1).bool()
    assert len(tokenizer) > 50  # the default top-k would cut this vocabulary
    torch.testing.assert_close(recomputed[alive], processed[alive], atol=1e-4, rtol=0)


def test_no_special_token_but_eos_is_sampled_inside_a_response(policy, tokenizer):
    torch.manual_seed(0)
    rollout = sample_responses(policy, tokenizer, PROMPTS * 8, max_new_tokens=4)
    inside = rollout.response_ids[rollout.response_mask.bool()]
    banned = torch.tensor(suppressed_token_ids(tokenizer))
    assert set(banned.tolist()) >= {tokenizer.pad_token_id, tokenizer.unk_token_id}
    assert inside.numel() > 1000
    assert not torch.isin(inside, banned).any()
    assert rollout.logprobs[rollout.response_mask.bool()].isfinite().all()


def make_trainer(policy, tokenizer, **overrides) -> PPOTrainer:
    settings = dict(steps=1, rollout_batch_size=32, mini_batch_size=8, ppo_epochs=2, learning_rate=1e-3,
                    max_new_tokens=4, max_grad_norm=0.05, max_approx_kl=None)
    config = policy.config.__class__(**(policy.config.to_dict() | {"num_labels": 1, "classifier_dropout": 0.1}))
    value = AutoModelForTokenClassification.from_config(config)
    torch.manual_seed(1)
    value.load_state_dict({k: v for k, v in policy.state_dict().items() if not k.startswith("lm_head")}, strict=False)
    reference = build_tiny_policy(tokenizer, TinyModel(hidden_size=32, num_heads=2, intermediate_size=64,
                                                       max_positions=32), 0)
    return PPOTrainer(config=Optimization(**(settings | overrides)), policy=policy, reference=reference,
                      value_model=value, tokenizer=tokenizer, prompts=PROMPTS, seed=0,
                      score_fn=lambda ps, rs, roll: torch.tensor([TASK.gold_score(p, r) for p, r in zip(ps, rs)]))


def test_policy_steps_do_not_depend_on_the_critics_gradient(tokenizer):
    """Clipped apart, a critic loss 100× larger leaves the policy's updates unchanged (clipped together,
    its gradient norm would scale every policy step down by a different factor)."""
    policies = []
    for value_coef in (0.01, 1.0):
        policy = build_tiny_policy(tokenizer, TinyModel(hidden_size=32, num_heads=2, intermediate_size=64,
                                                        max_positions=32), 0)
        trainer = make_trainer(policy, tokenizer, value_coef=value_coef)
        torch.manual_seed(2)
        exp, _ = trainer.make_experience(PROMPTS[:32])
        stats = trainer.update(exp)
        assert stats["policy_grad_norm"] > 0.05  # clipping is active
        policies.append(torch.cat([p.detach().flatten() for p in policy.parameters()]))
    torch.testing.assert_close(policies[0], policies[1])


def test_dropout_is_off_in_the_trained_critic(policy, tokenizer):
    trainer = make_trainer(policy, tokenizer)
    assert all(m.p == 0 for m in trainer.value_model.modules() if isinstance(m, torch.nn.Dropout))
    rollout = sample_responses(policy, tokenizer, PROMPTS[:8], max_new_tokens=4)
    trainer.value_model.train()
    first = value_forward(trainer.value_model, rollout.sequences, rollout.attention_mask, rollout.prompt_len)
    second = value_forward(trainer.value_model, rollout.sequences, rollout.attention_mask, rollout.prompt_len)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
