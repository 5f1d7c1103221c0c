"""What real chat models need, on tiny models made on the spot: chat-message records in TRL's and
OpenRLHF's shapes, chat-template rendering of prompts and pairs, pad == EOS scoring by position, several
stop ids, run-level length settings and the reasoning-gym judge."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from rlp_core import gym_tasks
from rlp_core.context import PhaseContext, PhaseError, check_prompts_fit
from rlp_core.data import DataError, Demonstration, PreferencePair, Prompt, load_records, parse_records
from rlp_core.judges import programmatic_judge
from rlp_core.models import encode_pairs, encode_prompts, load_tokenizer, render_prompt, reward_scores, train_tokenizer
from rlp_core.sampling import response_mask_from
from rlp_core.spec import RLPRun
from rlp_core.store import Store

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2="}]


def sums_tokenizer():
    texts = [f"{a}+{b}={a + b}" for a in range(10) for b in range(10)] + ["<|user|>", "<|assistant|>", "<|system|>"]
    tok = train_tokenizer(texts, 64)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return sums_tokenizer()


def rows(*docs):
    return [json.dumps(d) for d in docs]


def test_prompt_records_plain_and_as_messages():
    plain, trl, messages = parse_records(rows({"prompt": "1+2="}, {"prompt": USER}, {"messages": USER}), Prompt, "p")
    assert plain.prompt == "1+2="
    assert json.loads(trl.prompt) == USER and json.loads(messages.prompt) == USER


def test_preference_pairs_in_trl_and_openrlhf_shapes():
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    trl, openrlhf, plain = parse_records(rows(
        {"prompt": USER, "chosen": reply("3"), "rejected": reply("4")},
        {"chosen": USER + reply("3"), "rejected": USER + reply("4")},
        {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
    ), PreferencePair, "prefs")
    for pair in (trl, openrlhf):
        assert json.loads(pair.prompt) == USER and (pair.chosen, pair.rejected) == ("3", "4")
    assert plain.prompt == "1+2="
    (demo,) = parse_records(rows({"messages": USER + reply("3")}), Demonstration, "demos")
    assert json.loads(demo.prompt) == USER and demo.response == "3"


def test_a_bad_chat_record_names_the_field():
    with pytest.raises(DataError, match=r"prefs:1: .*rejected"):
        parse_records(rows({"prompt": USER, "chosen": [{"role": "assistant", "content": "3"}]}), PreferencePair, "prefs")


def test_chat_template_renders_prompts_and_pairs_alike(tokenizer):
    tokenizer.chat_template = CHAT
    try:
        rendered = render_prompt(tokenizer, json.dumps(USER))
        assert rendered == "<|system|>Be brief.<eos><|user|>1+2=<eos><|assistant|>"
        assert render_prompt(tokenizer, "1+2=") == "<|user|>1+2=<eos><|assistant|>"
        prompt = encode_prompts(tokenizer, ["1+2="])
        pair = encode_pairs(tokenizer, ["1+2="], ["3"], 64)
        n = prompt["input_ids"].shape[1]
        # the pair is the rendered prompt the policy was sampled on, then the response and EOS
        assert pair["input_ids"][0, :n].tolist() == prompt["input_ids"][0].tolist()
        assert pair["response_mask"][0].tolist() == [0] * n + [1] * (pair["input_ids"].shape[1] - n)
        assert pair["input_ids"][0, -1].item() == tokenizer.eos_token_id
    finally:
        tokenizer.chat_template = None
    # without a template: plain text, a conversation as its turns' text
    assert render_prompt(tokenizer, "1+2=") == "1+2="
    assert render_prompt(tokenizer, json.dumps(USER)) == "Be brief.\n1+2="


# a template that, like SmolLM2's, writes a default system message when the conversation has none
DEFAULTING = "{% if messages[0]['role'] != 'system' %}<|system|>Be helpful.<eos>{% endif %}" + CHAT


@pytest.fixture
def chat_model_dir(tokenizer, tmp_path):
    tokenizer.chat_template = DEFAULTING
    try:
        tokenizer.save_pretrained(tmp_path)
    finally:
        tokenizer.chat_template = None
    return tmp_path


def test_system_prompt_unset_is_the_templates_default(chat_model_dir):
    tok = load_tokenizer(chat_model_dir)
    assert render_prompt(tok, "1+2=") == "<|system|>Be helpful.<eos><|user|>1+2=<eos><|assistant|>"
    assert render_prompt(tok, "1+2=") == tok.apply_chat_template([{"role": "user", "content": "1+2="}],
                                                                 add_generation_prompt=True, tokenize=False)


def test_system_prompt_replaces_the_default(chat_model_dir):
    tok = load_tokenizer(chat_model_dir, system_prompt="Be brief.")
    assert render_prompt(tok, "1+2=") == "<|system|>Be brief.<eos><|user|>1+2=<eos><|assistant|>"
    # a conversation's own system message wins
    own = [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+2="}]
    assert render_prompt(tok, json.dumps(own)) == "<|system|>Add.<eos><|user|>1+2=<eos><|assistant|>"


def test_empty_system_prompt_renders_no_system_block(chat_model_dir):
    default, empty = load_tokenizer(chat_model_dir), load_tokenizer(chat_model_dir, system_prompt="")
    assert render_prompt(empty, "1+2=") == "<|user|>1+2=<eos><|assistant|>"
    n_default, n_empty = (encode_prompts(t, ["1+2="])["input_ids"].shape[1] for t in (default, empty))
    assert n_empty < n_default
    # the pair the RM reads starts with the same rendering
    pair = encode_pairs(empty, ["1+2="], ["3"], 64)
    assert pair["input_ids"][0, :n_empty].tolist() == encode_prompts(empty, ["1+2="])["input_ids"][0].tolist()


def test_system_prompt_needs_the_chat_template():
    with pytest.raises(ValueError, match="systemPrompt needs chatTemplate: auto"):
        RLPRun.model_validate({"spec": {"policy": {"chatTemplate": "none", "systemPrompt": ""}}})


def test_a_prompt_over_max_prompt_tokens_is_rejected_naming_it_and_the_fix():
    check_prompts_fit([3, 5, 5], 5, "spec.prompts")
    with pytest.raises(PhaseError) as err:
        check_prompts_fit([3, 9, 7, 2], 5, "spec.prompts")
    message = str(err.value)
    for part in ("spec.prompts", "prompt 1 renders to 9 tokens", "spec.policy.maxPromptTokens (5)", "2 of 4",
                 "at least 9", "shorten the prompts", 'policy.systemPrompt: ""'):
        assert part in message, part


def test_the_context_checks_rendered_prompts_of_a_pretrained_policy(chat_model_dir, tmp_path):
    run = RLPRun.model_validate({"spec": {"policy": {"model": "file:///models/x", "maxPromptTokens": 4}}})
    ctx = PhaseContext(run, 1, "generate", Store.from_uri(f"file://{tmp_path}/store"), tmp_path, tmp_path, None)
    plain = load_tokenizer(chat_model_dir, "none")
    ctx.check_fits(plain, ["1+2="], 8, "generation.maxNewTokens", "spec.prompts")  # 4 tokens: fits
    with pytest.raises(PhaseError, match=r"spec.prompts: prompt 0 renders to \d+ tokens"):
        ctx.check_fits(load_tokenizer(chat_model_dir), ["1+2="], 8, "generation.maxNewTokens", "spec.prompts")


def pad_eos_scores(tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """An untrained 1-layer Llama RM (initialised from `seed`) with pad == EOS scoring "1+2=3<eos>": batched beside
    a longer row and padded with EOS, alone, by transformers' own pooling, and by the head on the EOS's hidden state."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, num_labels=1)
    rm = LlamaForSequenceClassification(cfg).eval()
    eos = tokenizer.eos_token_id
    prompt = tokenizer("1+2=", add_special_tokens=False)["input_ids"]
    short = prompt + tokenizer("3", add_special_tokens=False)["input_ids"] + [eos]
    longer = prompt + tokenizer("33", add_special_tokens=False)["input_ids"] + [eos]
    width = max(len(short), len(longer)) + 2
    # [prompt | response | EOS] followed by right padding with the pad id, which is EOS
    ids = torch.tensor([short + [eos] * (width - len(short)), longer + [eos] * (width - len(longer))])
    mask = torch.tensor([[1] * len(short) + [0] * (width - len(short)), [1] * len(longer) + [0] * (width - len(longer))])
    with torch.no_grad():
        batched = reward_scores(rm, ids, mask)
        alone = reward_scores(rm, torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))
        hf_pooled = rm(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, len(short), dtype=torch.long)).logits
        hidden = rm.model(input_ids=torch.tensor([short])).last_hidden_state
        eos_head = rm.score(hidden[0, -1]).squeeze(-1)
    return {"batched": batched, "alone": alone, "hf_pooled": hf_pooled, "eos_head": eos_head}


def test_reward_model_with_pad_equal_to_eos_scores_the_eos_by_position(tokenizer):
    """Two rows that differ only in padding get one score; with pad == EOS transformers' own pooling would
    skip the response's EOS (and a response of EOS tokens entirely).

    The last assertion is a property of the pooling, not a training outcome: transformers' pooling reads the
    token before the EOS, ours the EOS, and on an untrained model the two scores differ by chance. Measured
    (docs/bench/outcome-spread.md, "tiny-properties", `pad_eos_pooling_gap`; seeds 0-4 at 1 and 2 threads, 10
    runs, the same to the bit at both thread counts): |hf_pooled - alone| 0.031-0.325. The bound, 1e-4, sits 300
    times under the smallest gap seen; a pooling that read the EOS too would give 0.
    """
    scores = pad_eos_scores(tokenizer)
    batched, alone, hf_pooled = scores["batched"], scores["alone"], scores["hf_pooled"]
    # Equal up to fp32 summation order, which differs with the batch's shape and the CPU's kernels; the pooling
    # that reads the wrong token is off by 0.031-0.325 (above), far outside these bounds.
    torch.testing.assert_close(batched[0], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone[0], scores["eos_head"], atol=1e-4, rtol=1e-4)  # the EOS itself
    assert abs(hf_pooled.item() - alone.item()) > 1e-4  # transformers' pooling reads another token here


def test_several_stop_ids_end_a_response():
    responses = torch.tensor([[5, 7, 2, 9], [5, 3, 9, 9], [5, 6, 6, 6]])
    mask, finished = response_mask_from(responses, [2, 3])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert finished.tolist() == [True, True, False]


def test_max_length_belongs_to_the_run_for_a_pretrained_policy(tmp_path):
    tiny = RLPRun.model_validate({"spec": {}})
    real = RLPRun.model_validate({"spec": {"policy": {"model": "file:///models/x", "maxPromptTokens": 100},
                                           "optimization": {"maxNewTokens": 24}}})
    store = Store.from_uri(f"file://{tmp_path}/store")
    ctx = lambda run: PhaseContext(run, 1, "optimize", store, tmp_path, tmp_path, None)  # noqa: E731
    assert ctx(tiny).max_length == tiny.spec.policy.sft.tiny.max_positions
    assert ctx(real).max_length == 124


GYM = "min_terms=2&max_terms=2&min_digits=1&max_digits=1&operators=+,-&allow_parentheses=false&allow_negation=false"


def test_reasoning_gym_splits_are_disjoint_and_judged_by_score_answer():
    prompts = load_records(f"reasoning-gym://basic_arithmetic/prompts?n=40&{GYM}", Prompt)
    held_out = load_records(f"reasoning-gym://basic_arithmetic/eval?n=40&{GYM}", Prompt)
    pairs = load_records(f"reasoning-gym://basic_arithmetic/preferences?n=50&flip=0&{GYM}", PreferencePair)
    assert len(prompts) == len(held_out) == 40
    assert not {p.prompt for p in prompts} & {p.prompt for p in held_out}
    assert not {p.prompt for p in pairs} & {p.prompt for p in held_out}
    judge = programmatic_judge(f"reasoning-gym://basic_arithmetic?{GYM}")
    assert all(judge(p.prompt, p.chosen) > judge(p.prompt, p.rejected) for p in pairs)
    question = pairs[0].prompt.removesuffix(gym_tasks.INSTRUCTION).removeprefix("Calculate ").rstrip(".")
    answer = str(gym_tasks._ENTRIES[pairs[0].prompt][1]["answer"])
    assert judge(pairs[0].prompt, answer) == 1.0
    assert 0 < judge(pairs[0].prompt, f"{question} = {answer}") < 1  # partial credit for the answer in a text
    assert {" = " in p.chosen for p in pairs} == {True, False}  # candidates come in several forms
    noisy = load_records(f"reasoning-gym://basic_arithmetic/preferences?n=200&flip=0.3&{GYM}", PreferencePair)
    flipped = sum(judge(p.prompt, p.chosen) < judge(p.prompt, p.rejected) for p in noisy) / len(noisy)
    assert 0.15 < flipped < 0.45


def test_reasoning_gym_last_number_reading_scores_worked_answers():
    uri = f"reasoning-gym://basic_arithmetic/preferences?n=60&flip=0&answer=last-number&{GYM}"
    pairs = load_records(uri, PreferencePair)
    judge = programmatic_judge(f"reasoning-gym://basic_arithmetic?answer=last-number&{GYM}")
    prompt = pairs[0].prompt
    question = prompt.removesuffix(gym_tasks.INSTRUCTION).removeprefix("Calculate ").rstrip(".")
    answer = int(gym_tasks._ENTRIES[prompt][1]["answer"])
    assert judge(prompt, f"{question} = {answer}") == judge(prompt, f" {answer}") == 1.0
    assert judge(prompt, f"{question} = {answer + 1}") == judge(prompt, "To solve this, we") == 0.0
    assert all(judge(p.prompt, p.chosen) == 1.0 and judge(p.prompt, p.rejected) == 0.0 for p in pairs)
    assert any(" = " in p.chosen for p in pairs) and any(not any(c.isdigit() for c in p.rejected) for p in pairs)
    with pytest.raises(ValueError, match="answer='first'.*last-number"):
        programmatic_judge(f"reasoning-gym://basic_arithmetic?answer=first&{GYM}")


def test_unknown_reasoning_gym_task_is_a_clear_error():
    with pytest.raises(ValueError, match="reasoning-gym://no_such_task.*cannot build task"):
        programmatic_judge("reasoning-gym://no_such_task")
    with pytest.raises(DataError, match="no split 'train'"):
        load_records(f"reasoning-gym://basic_arithmetic/train?{GYM}", Prompt)


def test_lora_reward_model_trains_adapters_and_head_and_saves_a_plain_merged_model(tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlp_core.models import save_model, with_lora
    from rlp_core.spec import LoRA

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, num_labels=1)
    rm = with_lora(LlamaForSequenceClassification(cfg), LoRA(rank=4, alpha=8), "SEQ_CLS")
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    assert any("score" in n for n in trainable)  # the fresh head is trained in full
    enc = encode_pairs(tokenizer, ["1+2=", "13+4="], ["3", "17"], 32)
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = -reward_scores(rm, enc["input_ids"], enc["attention_mask"]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        tuned = reward_scores(rm, enc["input_ids"], enc["attention_mask"])
    save_model(rm, tokenizer, tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert not hasattr(plain, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(plain, enc["input_ids"], enc["attention_mask"]), tuned, atol=1e-5, rtol=0)
