"""Batches sized by memory: how many rows of a forward pass fit `spec.batchMemory`.

A phase's batch sizes in the spec say how many rows the algorithm wants (a rollout, an RM minibatch);
how many of them one forward pass may hold at once is a property of the machine. So the phases that
run big batches (generation, evaluation, RM scoring, RM training and refinement) cut them into chunks
of `rows_that_fit(budget, bytes per row)`, where the budget is the working memory one chunk may take on
top of the weights and optimiser state: activations, KV cache and logits.

The bytes per row are estimated from the model's config and the longest sequence the run plans for
(`PhaseContext.max_length`), not measured: an estimate is the same on every machine, so the same spec
cuts its batches the same way everywhere and its results do not depend on how busy the machine was. It
counts what dominates a decoder's forward (per layer: residual stream, q/k/v, the MLP's three
intermediates, the attention matrix; the KV cache while generating; fp32 logits at the positions that
have them), so it is an upper bound of the right order, not an allocator-exact figure: docs/bench/
smollm2-cost.md shows the peaks it gives.

Chunking does not change what is computed: an RM minibatch cut into micro-batches accumulates the same
gradient (up to floating-point order); sampling in smaller chunks draws other random numbers, so a
smaller budget changes sampled text as a new seed would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_DEFAULT_BUDGET = 1 << 30
# On a GPU, the unset budget is this share of the device memory free when a phase sizes its batches
# (after its models are loaded): the rest is the allocator's slack and the backward's transients.
GPU_FREE_SHARE = 0.5


def parse_budget(quantity: str) -> int:
    """Bytes of a Kubernetes quantity ("512Mi", "2Gi", "1.5e9")."""
    # kubernetes is a core dependency; its quantity parser is pure (no cluster involved)
    from kubernetes.utils.quantity import parse_quantity

    return int(parse_quantity(quantity))


def budget_bytes(setting: str | None, device: torch.device) -> int:
    """The working memory a chunk may take: `setting` when given, else 1 GiB on a CPU (a laptop's share)
    or half of the GPU memory free right now."""
    if setting is not None:
        return parse_budget(setting)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_FREE_SHARE)
    return CPU_DEFAULT_BUDGET


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder-only transformer that its activations scale with."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_width: int  # key/value heads x head dim
    vocab: int
    element_bytes: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> DecoderShape:
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   heads=heads, kv_width=getattr(config, "num_key_value_heads", heads) * head_dim,
                   vocab=config.vocab_size, element_bytes=next(model.parameters()).element_size())

    def _layer(self, tokens: int, kept: bool) -> int:
        """Bytes of one layer's activations for one row: the transients of a forward, or (kept) what
        autograd saves for the backward."""
        width = (10 if kept else 5) * self.hidden + 2 * self.kv_width + (4 if kept else 3) * self.intermediate
        return self.element_bytes * (tokens * width + 2 * self.heads * tokens * tokens)

    def inference_row(self, tokens: int, logit_positions: int = 0) -> int:
        """One row of a forward without gradients (scoring): one layer's transients and fp32 logits."""
        return self._layer(tokens, kept=False) + 2 * 4 * logit_positions * self.vocab

    def generation_row(self, tokens: int) -> int:
        """One row of generate(): the KV cache for `tokens`, the prefill's transients and each step's
        fp32 logits and their processed copies."""
        cache = 2 * self.layers * self.kv_width * tokens * self.element_bytes
        return cache + self._layer(tokens, kept=False) + 3 * 4 * self.vocab

    def training_row(self, tokens: int, logit_positions: int = 0, checkpointing: bool = False) -> int:
        """One row of a forward kept for the backward: every layer's saved activations (with gradient
        checkpointing, each layer's input and one layer's recomputed activations) and fp32 logits."""
        layers = (self.layers * tokens * self.hidden * self.element_bytes + self._layer(tokens, kept=True)
                  if checkpointing else self.layers * self._layer(tokens, kept=True))
        return layers + 2 * 4 * logit_positions * self.vocab


def rows_that_fit(budget: int, row_bytes: int, most: int) -> int:
    """How many rows, at most `most` and at least 1, fit `budget` at `row_bytes` each."""
    return max(1, min(most, budget // max(1, row_bytes)))


def chunks(items: list, size: int) -> list[list]:
    """`items` cut into consecutive chunks of at most `size`."""
    return [items[i : i + size] for i in range(0, len(items), size)]
