"""Policy, reward and value models, and the token-level plumbing they share.

- Policy: any `AutoModelForCausalLM`.
- Reward model: `AutoModelForSequenceClassification` with one label, read at each row's last real
  token *by position* (the last 1 of the attention mask): the response's EOS when it has one. transformers'
  own pooling looks for the last token that is not `pad_token_id`, which skips the EOS, or the whole
  response, in chat models whose pad token is their EOS (Llama 3, SmolLM2).
- Value model: `AutoModelForTokenClassification` with one label, initialised from the reward model (the
  usual choice: the critic starts from a network that already reads rewards).

Sequences are laid out as `[left-padded prompt | response, right-padded]`. HF Llama does not derive
positions from the attention mask, so every forward pass here passes `position_ids` computed from it,
the same ones `generate()` uses: left padding then changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
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

from rlp_core.spec import LoRA, TinyModel

# Loading an RM from a policy checkpoint (fresh head) is intended; transformers' per-load report is noise here.
transformers_logging.set_verbosity_error()

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SYSTEM_PROMPT_ATTR = "rlp_system_prompt"  # the tokenizer attribute render_prompt reads (load_tokenizer)


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


def load_tokenizer(path: Path, chat_template: str = "auto", system_prompt: str | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer of a model directory, left-padding; `chat_template="none"` drops its chat template so
    prompts go in as plain text (`auto` keeps it when the model has one, see `render_prompt`).

    `system_prompt` rides on the tokenizer (not saved with it) so every rendering of a phase uses the spec's:
    None keeps the template's default, a string is the system message, "" renders no system block."""
    if not (Path(path) / "tokenizer.json").exists() and not (Path(path) / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{path}: tokenizer missing (no tokenizer.json); save the tokenizer with the model")
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:  # common in chat models: pad with EOS; masks and positions are explicit here
        tok.pad_token = tok.eos_token
    if chat_template == "none":
        tok.chat_template = None
    setattr(tok, SYSTEM_PROMPT_ATTR, system_prompt)
    return tok


def _chat(tokenizer: PreTrainedTokenizerFast, messages: list[dict], generation_prompt: bool = True) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def _without_system_block(tokenizer: PreTrainedTokenizerFast, messages: list[dict]) -> str:
    """The rendering with no system block: templates such as SmolLM2's insert a default system prompt whenever
    the first message is not a system one, so render an empty system message and cut its (leading) block out."""
    empty = [{"role": "system", "content": ""}]
    block, text = _chat(tokenizer, empty, generation_prompt=False), _chat(tokenizer, empty + messages)
    return text[len(block):] if block and text.startswith(block) else text


def render_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str) -> str:
    """The model's input text for a prompt: the chat template with the generation prompt when the tokenizer
    has one, else the plain text. A conversational prompt is the JSON text of its messages (rlp_core.data);
    its own system message wins over the tokenizer's system prompt (see `load_tokenizer`)."""
    messages = None
    if prompt.startswith("[{"):
        try:
            messages = json.loads(prompt)
        except json.JSONDecodeError:
            messages = None
    if not tokenizer.chat_template:
        return "\n".join(m["content"] for m in messages) if messages else prompt
    messages = messages or [{"role": "user", "content": prompt}]
    system = getattr(tokenizer, SYSTEM_PROMPT_ATTR, None)
    if system is None or messages[0]["role"] == "system":
        return _chat(tokenizer, messages)
    if system:
        return _chat(tokenizer, [{"role": "system", "content": system}, *messages])
    return _without_system_block(tokenizer, messages)


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation-config EOS ids."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return sorted({tokenizer.eos_token_id, *configured} - {None})


def load_policy(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def load_reward_model(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """An RM checkpoint, or a policy checkpoint to initialise one from (a fresh scalar head)."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    if model.config.pad_token_id is None:  # saved RMs load with plain transformers too, whose pooling needs it
        model.config.pad_token_id = load_tokenizer(path).pad_token_id
    return model


def load_value_model(path: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    return AutoModelForTokenClassification.from_pretrained(path, num_labels=1, dtype=dtype)


def frozen_dtype() -> torch.dtype:
    """dtype of models that are only run forward (reward model, separate reference): bf16 on GPUs that have it."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def with_lora(model: PreTrainedModel, lora: LoRA, task_type: str) -> PreTrainedModel:
    """`model` with trainable peft LoRA adapters (base weights frozen); task_type CAUSAL_LM or TOKEN_CLS
    (the value head of a TOKEN_CLS model stays fully trainable)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=task_type,
                        target_modules=lora.target_modules[0] if lora.target_modules == ["all-linear"] else lora.target_modules)
    return get_peft_model(model, config)


def freeze_backbone(model: PreTrainedModel) -> PreTrainedModel:
    """Only the head (`score`) stays trainable: no gradient flows into the backbone, so no backward pass runs
    through it (a cheap critic on a large model)."""
    model.requires_grad_(False)
    _unwrapped(model).score.requires_grad_(True)
    return model


def enable_gradient_checkpointing(model: PreTrainedModel) -> PreTrainedModel:
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def merged(model: PreTrainedModel) -> PreTrainedModel:
    """The plain transformers model: LoRA adapters merged into the weights (a no-op for a full model)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """save_pretrained of the merged model and its tokenizer: the output loads with plain transformers."""
    path.mkdir(parents=True, exist_ok=True)
    merged(model).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded batch of rendered prompts (chat template applied when the tokenizer has one)."""
    return tokenizer([render_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def encode_pairs(
    tokenizer: PreTrainedTokenizerFast, prompts: list[str], responses: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Prompt+response+EOS sequences, left-padded, with a mask of the response tokens (for SFT loss).

    Prompt and response are tokenized separately so the boundary is exact and matches generation.
    Overlong rows keep their end (the response), cutting the prompt's start.
    """
    rows, resp_masks = [], []
    for p, r in zip(prompts, responses, strict=True):
        p_ids = tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
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


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token (the last 1 of the mask), whatever the pad id is."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).long().argmax(1)


def _unwrapped(model: PreTrainedModel) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (its LoRA layers stay in place), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_token_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The backbone's final hidden state at each row's last real token: what the RM's scalar head reads."""
    out = _unwrapped(model).base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
    hidden = out.last_hidden_state
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]


def critic_features(model: PreTrainedModel, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """A critic's final hidden state at the position before each response token: what its value head (`score`)
    reads to give V(s_t)."""
    if isinstance(model, SharedBackboneCritic):
        return model.features(sequences, attention_mask, prompt_len)
    out = _unwrapped(model).base_model(input_ids=sequences, attention_mask=attention_mask,
                                       position_ids=position_ids(attention_mask))
    return out.last_hidden_state[:, prompt_len - 1 : -1]


class SharedBackboneCritic(nn.Module):
    """A value head on the LoRA policy's own backbone with its adapters disabled: the critic of `criticTraining:
    head` started from the policy, without a second copy of the backbone (0.54 GB on SmolLM2).

    With the adapters disabled the policy's backbone is exactly the weights a separate head-only critic would
    load from the same directory, and they stay frozen, so the values are the same; the head is initialised as
    transformers initialises a token-classification head, drawing the same random numbers. Only the head is
    this module's: the policy is held outside its submodules, so the critic's optimiser and checkpoint never
    see the policy's weights."""

    def __init__(self, hidden_size: int, init_std: float):
        super().__init__()
        self.score = torch.nn.utils.skip_init(nn.Linear, hidden_size, 1)  # no init of its own: no random draws
        nn.init.normal_(self.score.weight, std=init_std)
        nn.init.zeros_(self.score.bias)
        self._policy: PreTrainedModel | None = None

    def attach(self, policy: PreTrainedModel) -> SharedBackboneCritic:
        """Read features from `policy` (a peft model: its adapters are disabled while the critic reads)."""
        object.__setattr__(self, "_policy", policy)  # not a submodule, see the class docstring
        return self

    def features(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
        with self._policy.disable_adapter():
            return critic_features(self._policy, sequences, attention_mask, prompt_len)


def backbone_frozen(model: PreTrainedModel) -> bool:
    """Whether nothing below a critic's or RM's head trains (`freeze_backbone`, `SharedBackboneCritic`)."""
    if isinstance(model, SharedBackboneCritic):
        return True
    return not any(p.requires_grad for p in _unwrapped(model).base_model.parameters())


def value_head(model: PreTrainedModel) -> nn.Module:
    """The scalar head of a reward model or critic (inside a peft wrapper too)."""
    return _unwrapped(model).score


def reward_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar RM score per row, read at the last real token by position (pad == EOS safe)."""
    hidden = last_token_hidden(model, input_ids, attention_mask)
    return value_head(model)(hidden.to(model.dtype)).squeeze(-1)


def suppressed_token_ids(tokenizer: PreTrainedTokenizerFast, stop_ids: Sequence[int] = ()) -> list[int]:
    """Special tokens a response may not contain: every special token except EOS (and the other stop ids).

    Decoding drops special tokens, so a `<pad>` or `<unk>` sampled inside a response would make the
    gold judge and RLP-SPG read another text than the RM scores. The policy π is therefore the model's
    distribution renormalised over the other tokens, in sampling and in every log-prob alike.
    """
    return sorted(set(tokenizer.all_special_ids) - {tokenizer.eos_token_id, *stop_ids})


# Cap on the fp32 [rows, R, V] block the log-softmax works on at once: a 49k-token vocabulary makes the full
# block of a rollout batch gigabytes.
CHUNK_BYTES = 256 * 2**20


def masked_logits(logits: torch.Tensor, suppress: Sequence[int] = ()) -> torch.Tensor:
    """Logits with the suppressed token ids set to −inf (a copy; `logits` is left unchanged)."""
    if not suppress:
        return logits
    return logits.index_fill(-1, torch.tensor(list(suppress), device=logits.device), float("-inf"))


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """−Σ p·log p over the last dim; a −inf log-prob (a suppressed token) adds 0, not 0·(−inf) = nan."""
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


def _chunk_stats(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, suppress: tuple[int, ...], entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logp = torch.log_softmax(masked_logits(logits.float(), suppress) / temperature, dim=-1)
    chosen = torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return chosen, entropy_from_logprobs(logp) if entropy else None


def token_stats(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, suppress: Sequence[int] = (),
    *, entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log π(token), entropy of π or None) under `logits / temperature` over the non-suppressed vocabulary;
    logits[:, t] predicts tokens[:, t]. A suppressed token (only ever padding here) gets −inf.

    Worked in chunks of batch rows of at most CHUNK_BYTES of fp32, so the [B, T, V] log-softmax never exists
    whole; under autograd each chunk is checkpointed, so the backward keeps only its input logits (a view)
    and recomputes the softmax chunk by chunk.
    """
    rows = max(1, CHUNK_BYTES // (4 * logits.shape[1] * logits.shape[2]))
    grad = torch.is_grad_enabled() and logits.requires_grad
    args = (temperature, tuple(suppress), entropy)
    parts = [
        checkpoint(_chunk_stats, logits[i : i + rows], tokens[i : i + rows], *args, use_reentrant=False) if grad
        else _chunk_stats(logits[i : i + rows], tokens[i : i + rows], *args)
        for i in range(0, logits.shape[0], rows)
    ]
    logprobs = torch.cat([lp for lp, _ in parts])
    return logprobs, torch.cat([h for _, h in parts]) if entropy else None


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, suppress: Sequence[int] = ()
) -> torch.Tensor:
    """log π(token) of `token_stats`."""
    return token_stats(logits, tokens, temperature, suppress)[0]


def response_logprobs(
    model: PreTrainedModel, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, temperature: float,
    suppress: Sequence[int] = (), *, entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropy or None) of the response tokens sequences[:, prompt_len:] under `model`, with the
    suppressed ids at −inf; log-probs of suppressed tokens (padding) are set to 0.

    Only the last R+1 positions get logits (`logits_to_keep`): the prompt's would be most of a [B, P+R, V]
    tensor that nothing reads.
    """
    response_len = sequences.shape[1] - prompt_len
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                logits_to_keep=response_len + 1)
    logprobs, ent = token_stats(out.logits[:, :-1], sequences[:, prompt_len:], temperature, suppress, entropy=entropy)
    return logprobs.masked_fill(torch.isinf(logprobs), 0.0), ent


def disable_dropout(model: nn.Module) -> nn.Module:
    """p=0 in every dropout layer (as TRL does for all four PPO models): rollout values and log-probs come
    from eval mode, so training with dropout on would make the update see other functions than the rollout."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
