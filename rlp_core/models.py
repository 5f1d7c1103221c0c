"""Policy, reward and value models, and the token-level plumbing they share.

- Policy: any `AutoModelForCausalLM`.
- Reward model: `AutoModelForSequenceClassification` with one label. transformers scores the last
  non-pad token of each row (it locates it from `pad_token_id`, so left and right padding both work),
  which is the RM convention of the spec; the tokenizer's pad token is distinct from EOS so a response's
  EOS is the token scored.
- Value model: `AutoModelForTokenClassification` with one label, initialised from the reward model (the
  usual choice: the critic starts from a network that already reads rewards).

Sequences are laid out as `[left-padded prompt | response, right-padded]`. HF Llama does not derive
positions from the attention mask, so every forward pass here passes `position_ids` computed from it,
the same ones `generate()` uses: left padding then changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import logging as transformers_logging
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from rlp_core.spec import TinyModel

# Loading an RM from a policy checkpoint (fresh head) is intended; transformers' per-load report is noise here.
transformers_logging.set_verbosity_error()

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained on the task's own text (no download)."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    fast.padding_side = "left"
    return fast


def build_tiny_policy(tokenizer: PreTrainedTokenizerFast, cfg: TinyModel, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.padding_side = "left"
    return tok


def load_policy(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def load_reward_model(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """An RM checkpoint, or a policy checkpoint to initialise one from (a fresh scalar head)."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    if model.config.pad_token_id is None:  # the score is read at the last non-pad token: it must know the pad id
        model.config.pad_token_id = load_tokenizer(path).pad_token_id
    return model


def load_value_model(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    return AutoModelForTokenClassification.from_pretrained(path, num_labels=1, dtype=dtype)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch."""
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def encode_pairs(
    tokenizer: PreTrainedTokenizerFast, prompts: list[str], responses: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Prompt+response+EOS sequences, left-padded, with a mask of the response tokens (for SFT loss).

    Prompt and response are tokenized separately so the boundary is exact and matches generation.
    Overlong rows keep their end (the response), cutting the prompt's start.
    """
    rows, resp_masks = [], []
    for p, r in zip(prompts, responses, strict=True):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p_ids + r_ids)[-max_length:]
        mask = ([0] * len(p_ids) + [1] * len(r_ids))[-max_length:]
        rows.append(ids)
        resp_masks.append(mask)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, m) in enumerate(zip(rows, resp_masks)):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention[i, width - len(ids):] = 1
        response_mask[i, width - len(ids):] = torch.tensor(m)
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response_mask}


def reward_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar RM score per row, read at the last non-pad token."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    return out.logits.squeeze(-1)


def suppressed_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Special tokens a response may not contain: every special token except EOS.

    Decoding drops special tokens, so a `<pad>` or `<unk>` sampled inside a response would make the
    gold judge and RLP-SPG read another text than the RM scores. The policy π is therefore the model's
    distribution renormalised over the other tokens, in sampling and in every log-prob alike.
    """
    return sorted(set(tokenizer.all_special_ids) - {tokenizer.eos_token_id})


def masked_logits(logits: torch.Tensor, suppress: Sequence[int] = ()) -> torch.Tensor:
    """Logits with the suppressed token ids set to −inf (a copy; `logits` is left unchanged)."""
    if not suppress:
        return logits
    logits = logits.clone()
    logits[..., list(suppress)] = float("-inf")
    return logits


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, suppress: Sequence[int] = ()
) -> torch.Tensor:
    """log π(token) under `logits / temperature` over the non-suppressed vocabulary; logits[:, t] predicts
    tokens[:, t]. A suppressed token (only ever padding here) gets −inf, which callers mask out."""
    logp = torch.log_softmax(masked_logits(logits.float(), suppress) / temperature, dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logprobs(
    model: PreTrainedModel, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, temperature: float,
    suppress: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, logits) of the response tokens sequences[:, prompt_len:] under `model`; the logits have
    the suppressed ids at −inf, and log-probs of suppressed tokens (padding) are set to 0."""
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    logits = masked_logits(out.logits[:, prompt_len - 1 : -1], suppress)
    logprobs = token_logprobs(logits, sequences[:, prompt_len:], temperature)
    return logprobs.masked_fill(torch.isinf(logprobs), 0.0), logits


def disable_dropout(model: nn.Module) -> nn.Module:
    """p=0 in every dropout layer (as TRL does for all four PPO models): rollout values and log-probs come
    from eval mode, so training with dropout on would make the update see other functions than the rollout."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
