"""Batched sampling of a policy: k samples per prompt, left-padded prompts, EOS handling.

`sample_responses` is shared by the generate phase, PPO/APA rollouts and evaluation, so all three see
the same tokens, masks and log-probs. The log-probs are of the sampling distribution (logits divided
by the temperature, special tokens other than EOS suppressed), recomputed with a forward pass over the
full sequences rather than taken from `generate()`'s processed scores, which top-p would distort.

Sampling must draw from exactly the π whose log-probs enter PPO's ratio and KL: top-k is switched off
with `top_k=0` (transformers ≥5 applies its default of 50 when it is None), and the suppressed tokens
are masked the same way in `generate()` (suppress_tokens) and in the recomputed log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

from rlp_core.models import encode_prompts, response_logprobs, stop_token_ids, suppressed_token_ids


@dataclass
class Rollout:
    """One batch of sampled responses. `sequences` = [left-padded prompt | response]."""

    sequences: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R): prompt mask, then response tokens up to and including EOS
    response_mask: torch.Tensor  # (B, R): valid response tokens
    logprobs: torch.Tensor | None  # (B, R): sampling log-probs, 0 on padding; None when not asked for
    finished: torch.Tensor  # (B,) bool: the response ended with EOS
    prompt_len: int

    @property
    def response_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len :]


def response_mask_from(responses: torch.Tensor, eos_ids: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of tokens up to and including the first stop token; and whether one occurred."""
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device))
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return (~after_eos).long(), is_eos.any(1)


def generation_config(
    tokenizer: PreTrainedTokenizerFast, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
    do_sample: bool = True, stop_ids: list[int] | None = None,
) -> GenerationConfig:
    """The `generate()` settings of every sampler here: no top-k, special tokens other than the stop ids
    (the EOS ids of the tokenizer and the model's generation config) suppressed."""
    stop_ids = stop_ids or [tokenizer.eos_token_id]
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None, top_k=0, suppress_tokens=suppressed_token_ids(tokenizer, stop_ids) or None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids, bos_token_id=None,
    )


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    logprobs: bool = True,
) -> Rollout:
    """k-sample rollouts of `prompts`; `logprobs=False` skips the extra forward pass of the sampling log-probs
    (evaluation reads only the texts)."""
    enc = encode_prompts(tokenizer, prompts)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    prompt_len = enc["input_ids"].shape[1]
    stop_ids = stop_token_ids(model, tokenizer)
    config = generation_config(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               do_sample=do_sample, stop_ids=stop_ids)
    was_training = model.training
    model.eval()
    sequences = model.generate(**enc, generation_config=config)
    responses = sequences[:, prompt_len:]
    if responses.shape[1] < max_new_tokens:  # every row stopped early: pad to a fixed width
        pad = torch.full((len(prompts), max_new_tokens - responses.shape[1]), tokenizer.pad_token_id,
                         dtype=responses.dtype, device=responses.device)
        responses = torch.cat([responses, pad], dim=1)
        sequences = torch.cat([sequences[:, :prompt_len], responses], dim=1)
    resp_mask, finished = response_mask_from(responses, stop_ids)
    attention = torch.cat([enc["attention_mask"], resp_mask], dim=1)
    sampled = None
    if logprobs:
        sampled = response_logprobs(model, sequences, attention, prompt_len, temperature,
                                    suppressed_token_ids(tokenizer, stop_ids))[0] * resp_mask
    model.train(was_training)
    return Rollout(sequences, attention, resp_mask, sampled, finished, prompt_len)


def decode_responses(tokenizer: PreTrainedTokenizerFast, rollout: Rollout) -> list[str]:
    ids = rollout.response_ids * rollout.response_mask + tokenizer.pad_token_id * (1 - rollout.response_mask)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
