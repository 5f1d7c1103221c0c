"""The RLPRun spec: one typed model shared by `rlp run`, `rlp phase` and the operator.

Field names are snake_case in Python and camelCase in YAML/JSON (the Kubernetes convention). Unknown
fields are rejected (`extra="forbid"`) so a typo fails with the field's name instead of being ignored.
The CRD schema in `crds/` is generated from these models (`rlp crd`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import operator
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasGenerator, BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler, StringConstraints,
    ValidationError, field_validator, model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import core_schema

API_GROUP = "rlp.dev"
API_VERSION = "v1alpha1"
KIND = "RLPRun"

PHASES_PER_ROUND = ("generate", "refine", "synthesize", "optimize")
PhaseName = Literal["sft", "reward", "generate", "refine", "synthesize", "optimize", "evaluate"]


@dataclasses.dataclass(frozen=True)
class Matches:
    """A string rule with one message, enforced by pydantic here and by the apiserver through the CRD.

    The JSON schema carries it as `x-rlp-match` (`x-rlp-cluster-match` for `on_cluster`, a rule only the
    CRD enforces: what a job pod cannot read, such as local paths); `rlp_operator.crd` turns both into
    CEL rules. Patterns are anchored and avoid backslashes and quotes, so the same text is a Python and
    an RE2 (CEL) regular expression.
    """

    pattern: str
    message: str
    on_cluster: tuple[str, str] | None = None  # (pattern, message) the CRD adds; `rlp run` does not

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        out = handler(schema)
        out["x-rlp-match"] = {"pattern": self.pattern, "message": self.message}
        if self.on_cluster:
            out["x-rlp-cluster-match"] = {"pattern": self.on_cluster[0], "message": self.on_cluster[1]}
        return out

    def _check(self, value: str) -> str:
        if not re.fullmatch(self.pattern, value):
            raise ValueError(self.message)
        return value


_BUCKET = "[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
_S3_OBJECT = f"s3://{_BUCKET}/[^/].*"
_LOCAL = "file://.+|[^:]+"  # file://PATH or a plain path (no scheme)
_S3_FORM = "s3://BUCKET/KEY, where BUCKET has 3-63 lowercase letters, digits, dots or hyphens"

Quantity = Annotated[
    str,
    StringConstraints(max_length=64),
    Matches(
        "^[+]?([0-9]+([.][0-9]*)?|[.][0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$",
        "must be a non-negative Kubernetes quantity such as 4, 500m, 16Gi or 1.5e9",
    ),
]
Image = Annotated[
    str,
    StringConstraints(max_length=512),
    Matches("^[!-~]+$", "must be a container image reference such as ghcr.io/org/image:tag (not empty, no spaces)"),
]
# A Kubernetes object name (DNS subdomain: Secrets, ServiceAccounts, PriorityClasses).
ObjectName = Annotated[
    str,
    StringConstraints(max_length=253),
    Matches("^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "must be a Kubernetes object name: lowercase letters, digits, '-' and '.'"),
]
LabelValue = Annotated[
    str,
    StringConstraints(max_length=63),
    Matches("^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$", "must be a Kubernetes label value (at most 63 "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"),
]
EndpointURL = Annotated[
    str,
    StringConstraints(max_length=2048),
    Matches(
        "^https?://[A-Za-z0-9.-]+(:[0-9]+)?(/[!-~]*)?$",
        "must be an http(s) URL of the S3 server such as https://s3.example.com or http://10.0.0.5:9000",
    ),
]
StorageURI = Annotated[
    str,
    StringConstraints(max_length=2048),
    Matches(
        f"^(s3://{_BUCKET}(/[^/]+)*/?|{_LOCAL})$",
        "must be s3://BUCKET/PREFIX (BUCKET: 3-63 lowercase letters, digits, dots or hyphens, starting and "
        "ending with a letter or digit; no empty path segments) or, for `rlp run`, file://PATH",
        on_cluster=("^s3://", "must be s3://BUCKET/PREFIX on a cluster: file:// storage would be the operator's "
                              "and each pod's own disk (use file:// only with `rlp run`)"),
    ),
]
DataURI = Annotated[
    str,
    StringConstraints(max_length=2048),
    Matches(
        f"^((builtin|reasoning-gym)://[a-z0-9_-]+/[a-z0-9_-]+([?].*)?|{_S3_OBJECT}|{_LOCAL})$",
        f"must name a JSONL file: {_S3_FORM}; builtin://TASK/SPLIT or reasoning-gym://TASK/SPLIT; or, for "
        "`rlp run`, a local path or file://PATH (http(s) URLs are not read)",
        on_cluster=("^(s3|builtin|reasoning-gym)://", "must be s3://BUCKET/KEY, builtin://TASK/SPLIT or "
                    "reasoning-gym://TASK/SPLIT on a cluster: a local "
                                        "path is not readable by the phase pods"),
    ),
]
ModelURI = Annotated[
    str,
    StringConstraints(max_length=2048),
    Matches(
        f"^({_S3_OBJECT}|hf://[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(@[!-~]+)?|packaged://[a-z0-9_-]+|{_LOCAL})$",
        "must name a save_pretrained directory: s3://BUCKET/PREFIX/, hf://ORG/NAME[@REVISION], packaged://NAME "
        "or, for `rlp run`, a local path or file://PATH",
        on_cluster=("^(s3|hf|packaged)://", "must be s3://BUCKET/PREFIX/, hf://ORG/NAME[@REVISION] or packaged://NAME "
                    "on a cluster: a local path is not readable by the phase pods"),
    ),
]


class SpecModel(BaseModel):
    """Base: camelCase aliases, strict keys, validated defaults."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(alias=to_camel),
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )


class TinyModel(SpecModel):
    """A small Llama built from a config, with a tokenizer trained on the task's own text.

    Used when no pretrained checkpoint is given: the quickstart, the tests and the offline benchmark.
    """

    hidden_size: int = Field(64, ge=8, le=4096, description="Transformer width.")
    num_layers: int = Field(2, ge=1, le=64, description="Number of decoder layers.")
    num_heads: int = Field(4, ge=1, le=64, description="Attention heads; must divide hiddenSize.")
    intermediate_size: int = Field(128, ge=8, le=16384, description="MLP width.")
    max_positions: int = Field(128, ge=16, le=8192, description="Longest prompt+response in tokens.")
    vocab_size: int = Field(96, ge=32, le=65536, description="Target size of the trained BPE vocabulary.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModel:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hiddenSize ({self.hidden_size}) must be a multiple of numHeads ({self.num_heads})"
            )
        return self


class Training(SpecModel):
    """Optimiser settings shared by the supervised phases (SFT, reward model)."""

    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the data (fractions allowed).")
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0)


class SFT(SpecModel):
    """Supervised fine-tuning, run before round 1 when `policy.model` is not given."""

    demonstrations: DataURI = Field(
        "builtin://arith/demonstrations",
        description="JSONL of {prompt, response}; builtin://<task>/demonstrations for a built-in task.",
    )
    tiny: TinyModel = Field(default_factory=TinyModel, description="Architecture of the model trained from scratch.")
    training: Training = Field(default_factory=lambda: Training(epochs=6, learning_rate=3e-3, batch_size=64))


class Policy(SpecModel):
    model: ModelURI | None = Field(
        None, description="HF-format directory of the starting (SFT) policy: file://, s3://, hf://org/name@revision or "
        "packaged://smollm2; omit to run the sft phase."
    )
    chat_template: Literal["auto", "none"] = Field(
        "auto", description="auto: prompts go through the tokenizer's chat template (with the generation prompt) when "
        "it has one, for policy, reward model, critic and evaluation alike; none: plain text."
    )
    system_prompt: str | None = Field(
        None, max_length=4096, description="System message of every prompt rendered through the chat template (policy, "
        "reward model, critic, evaluation; a prompt's own system message wins): unset: the template's default; "
        "\"\": no system block at all. SmolLM2's default costs 21 tokens a prompt: reasoning-gym basic_arithmetic "
        "prompts render to 49-60 tokens with it, 28-39 with \"\" and 38-49 with \"You are a calculator.\"."
    )
    max_prompt_tokens: int = Field(
        256, ge=1, le=131072, description="Longest rendered prompt of a pretrained policy; with the longest maxNewTokens "
        "it bounds every sequence (a tiny model uses sft.tiny.maxPositions). A longer prompt stops the phase."
    )
    sft: SFT = Field(default_factory=SFT)

    @model_validator(mode="after")
    def _system_prompt_needs_a_template(self) -> Policy:
        if self.system_prompt is not None and self.chat_template == "none":
            raise ValueError("systemPrompt needs chatTemplate: auto (plain-text prompts have no system message); "
                             "unset systemPrompt or set chatTemplate: auto")
        return self


class LoRA(SpecModel):
    """Low-rank adapters (peft). On the policy the reference policy is the same model with its adapters
    disabled (no second copy); saved models are merged (they load with plain transformers)."""

    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is scaled by alpha/rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Adapter dropout; PPO switches dropout off in its models.")
    target_modules: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, max_length=16, description="Module names the adapters wrap (or [all-linear]).",
    )


class RewardModel(SpecModel):
    model: ModelURI | None = Field(
        None, description="HF-format directory (file://, s3://, hf://, packaged://) of a trained reward model; omit to "
        "run the reward phase, which trains one from the policy's backbone."
    )
    human_preferences: DataURI = Field(
        "builtin://arith/preferences", description="JSONL of {prompt, chosen, rejected} human preference pairs."
    )
    held_out_fraction: float = Field(0.1, ge=0, lt=1, description="Share of pairs kept out to measure accuracy.")
    lora: LoRA | None = Field(
        None, description="Train LoRA adapters and the score head instead of all weights (reward, refine, synthesize "
        "and SER training); the saved RM is the merged model."
    )
    training: Training = Field(default_factory=lambda: Training(epochs=2, learning_rate=1e-3, batch_size=32))


class Generation(SpecModel):
    """Sampling of the policy: rollouts in the generate phase and responses in evaluate."""

    samples_per_prompt: int = Field(8, ge=1, le=256)
    max_prompts: int | None = Field(None, ge=1, le=10_000_000, description="Use at most this many prompts per round.")
    temperature: float = Field(1.0, gt=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(8, ge=1, le=8192)
    batch_size: int = Field(64, ge=1, le=4096, description="Prompts per generate() call.")


class UML(SpecModel):
    """RLP-UML: multi-view information bottleneck on policy samples (see rlp_core.uml).

    The stochastic representation's mean is the RM's own last-token hidden state (what the reward head
    reads), so its size is the model's width: there is no separate latent size to set.
    """

    alpha: float = Field(0.1, ge=0, description="Weight of the MIB term against the pairwise loss.")
    beta: float = Field(1e-3, ge=0, description="Final weight of the symmetric-KL term.")
    beta_start: float = Field(1e-4, ge=0, description="Initial weight of the symmetric-KL term (annealed).")
    training: Training = Field(default_factory=lambda: Training(epochs=1, learning_rate=5e-4, batch_size=32))


class SPG(SpecModel):
    """RLP-SPG: synthetic preference pairs from self-consistent policy samples (see rlp_core.spg)."""

    equivalence: Literal["auto", "answer", "normalized", "exact", "embedding"] = Field(
        "auto",
        description="How two samples are judged to give the same answer: `answer` compares the answers read "
        "from them (by answerPattern, else by the evaluation judge's reading); `normalized` / `exact` compare "
        "the text; `embedding` its sentence embeddings. `auto`: answer where an answer reading exists, else "
        "normalized.",
    )
    answer_pattern: str | None = Field(
        None, max_length=512,
        description="Regular expression that reads a reply's answer for `answer` equivalence: the last match "
        "(its first group when it has one). A reply with no match has no answer and is never chosen.",
    )
    embedding_threshold: float = Field(0.9, gt=0, le=1, description="Cosine similarity for `embedding`.")
    max_entropy: float | None = Field(
        None, ge=0, description="Keep prompts whose semantic entropy is at most this (nats)."
    )
    keep_fraction: float = Field(
        0.5, gt=0, le=1, description="Used when maxEntropy is unset: keep this most-confident share of prompts."
    )
    pairs_per_prompt: int = Field(1, ge=1, le=64)
    synthetic_weight: float = Field(
        1.0, gt=0, le=1000,
        description="Loss weight of a synthetic pair relative to a human pair (human pairs can drown a few "
        "hundred synthetic ones).",
    )
    training: Training = Field(default_factory=lambda: Training(epochs=1, learning_rate=5e-4, batch_size=32))

    @field_validator("answer_pattern")
    @classmethod
    def _pattern_compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"not a regular expression ({err}); e.g. '(-?\\d+)\\s*$'") from None
        return pattern


class SER(SpecModel):
    """Self-Evolved Reward learning (see rlp_core.ser)."""

    high_confidence: float = Field(0.9, gt=0.5, lt=1, description="p=σ(Δr) above this (or below 1-it) is confident.")
    low_confidence: float = Field(0.7, gt=0.5, lt=1, description="Lower edge of the middle band used once easy pairs run out.")
    max_iterations: int = Field(3, ge=1, le=100)
    min_new_pairs: int = Field(8, ge=0, le=1_000_000, description="Stop when an iteration selects fewer new pairs than this.")
    max_pairs_per_prompt: int = Field(
        8, ge=1, le=1024, description="Unlabeled pairs drawn from the different responses to one prompt."
    )
    training: Training = Field(default_factory=lambda: Training(epochs=1, learning_rate=5e-4, batch_size=32))

    @model_validator(mode="after")
    def _band_ordered(self) -> SER:
        if self.low_confidence > self.high_confidence:
            raise ValueError("lowConfidence must not exceed highConfidence")
        return self


class RewardLearning(SpecModel):
    strategy: Literal["rlp-spg", "rlp-uml", "rlp", "ser", "none"] = Field(
        "rlp-spg",
        description="rlp-uml: refine only; rlp-spg: synthesize only; rlp: both; ser: self-evolved RM; none: fixed RM.",
    )
    uml: UML = Field(default_factory=UML)
    spg: SPG = Field(default_factory=SPG)
    ser: SER = Field(default_factory=SER)


class PPO(SpecModel):
    clip_range: float = Field(0.2, gt=0, lt=1, description="ε of the clipped ratio.")


class APA(SpecModel):
    lam: float = Field(
        0.1, gt=0, description="λ of APA's target π_init·exp(A/λ): larger stays closer to the initial policy."
    )


class GRPO(SpecModel):
    """GRPO (Shao et al. 2024) and its Dr. GRPO variant (Liu et al. 2025); see rlp_core.grpo."""

    group_size: int = Field(4, ge=2, le=256, description="Samples per prompt; rolloutBatchSize counts samples and "
                            "must be a multiple of it.")
    clip_range: float = Field(0.2, gt=0, lt=1, description="ε of the clipped ratio.")
    scale_rewards: bool = Field(True, description="Divide a group's centred rewards by their standard deviation "
                                "(GRPO); false: centre only (Dr. GRPO).")
    length_normalize: bool = Field(True, description="Average each response's token losses over its length (GRPO); "
                                   "false: sum them over maxNewTokens (Dr. GRPO, no bias towards long wrong answers).")
    kl_in: Literal["loss", "reward"] = Field(
        "loss", description="Where klCoef's KL to the reference goes: a k3-estimated term of the loss (as the paper), "
        "or subtracted from each response's reward before the group baseline (as PPO here).",
    )


class RLOO(SpecModel):
    """RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline; see rlp_core.rloo."""

    group_size: int = Field(4, ge=2, le=256, description="Samples per prompt; rolloutBatchSize counts samples and "
                            "must be a multiple of it.")
    clip_range: float = Field(0.2, gt=0, lt=1, description="ε of the clipped ratio (only bites from the second "
                              "ppoEpoch on: the first is plain REINFORCE).")


class DeepSpeed(SpecModel):
    enabled: Literal["auto", "true", "false"] = Field(
        "auto", description="auto: ZeRO when CUDA is present or the phase spans several processes."
    )
    zero_stage: int = Field(2, ge=0, le=3)
    bf16: Literal["auto", "true", "false"] = Field("auto", description="auto: bf16 on GPUs that support it.")


class RewardTokenRef(SpecModel):
    name: ObjectName = Field(..., description="Secret holding the reward endpoint's bearer token.")
    key: Annotated[str, StringConstraints(min_length=1, max_length=253)] = Field(
        "token", description="Key of the token in the Secret (exposed to the phase as RLP_REWARD_TOKEN).")


class RewardFunction(SpecModel):
    """A user's reward for `optimization.reward: function` (see rlp_core.reward_functions)."""

    uri: Annotated[str, StringConstraints(max_length=2048), Matches(
        "^(https?://[^ ]+|python://[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*)$",
        "must be an http(s):// reward endpoint or python://package.module:function")] = Field(
        ..., description="http(s)://…: POSTed batches of JSON {query, prompts, responses}, answering {rewards: [...]} "
        "(OpenRLHF's remote reward protocol); python://pkg.mod:fn: fn(prompts, responses) -> list of floats, "
        "importable in the job image.",
    )
    timeout_seconds: float = Field(30.0, gt=0, le=3600, description="HTTP: per request.")
    retries: int = Field(3, ge=0, le=20, description="HTTP: retries of a failed or timed-out request, with "
                         "exponential backoff (0.5 s, 1 s, 2 s, …).")
    batch_size: int = Field(64, ge=1, le=65536, description="Responses per request or call.")
    token_secret_ref: RewardTokenRef | None = Field(
        None, description="HTTP: a bearer token from a Secret (on the cluster); `rlp run` reads RLP_REWARD_TOKEN.")


class Optimization(SpecModel):
    algorithm: Literal["ppo", "apa", "grpo", "rloo"] = Field(
        "ppo", description="ppo and apa train a critic; grpo and rloo are critic-free (a baseline from each "
        "prompt's group of samples), so no value model is loaded.",
    )
    reward: Literal["reward-model", "judge", "function"] = Field(
        "reward-model",
        description="What the policy is optimised against: the (refined) reward model, the evaluation judge "
        "itself (a programmatic/verifiable reward; also the gold-reward ceiling in benchmarks), or your own "
        "rewardFunction (an HTTP endpoint or a Python function).",
    )
    reward_function: RewardFunction | None = Field(None, description="Needed by reward: function.")
    value_init: Literal["reward-model", "policy"] = Field(
        "reward-model", description="Backbone the critic starts from: the reward model (reads rewards already) or the policy."
    )
    ppo: PPO = Field(default_factory=PPO)
    apa: APA = Field(default_factory=APA)
    grpo: GRPO = Field(default_factory=GRPO)
    rloo: RLOO = Field(default_factory=RLOO)
    steps: int = Field(40, ge=1, le=1_000_000, description="Rollout/update iterations per round.")
    rollout_batch_size: int = Field(64, ge=1, le=65536, description="Responses per rollout (grpo / rloo: "
                                    "groupSize samples of each of rolloutBatchSize / groupSize prompts).")
    mini_batch_size: int = Field(32, ge=1, le=65536)
    ppo_epochs: int = Field(2, ge=1, le=64)
    learning_rate: float = Field(3e-4, gt=0, le=1)
    value_learning_rate: float | None = Field(None, gt=0, le=1, description="Defaults to learningRate.")
    warmup_steps: int = Field(2, ge=0, le=1_000_000)
    max_grad_norm: float = Field(1.0, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    value_clip: float = Field(0.2, gt=0)
    value_coef: float = Field(0.5, ge=0)
    kl_coef: float = Field(0.05, ge=0, description="β of the per-token KL penalty (initial value when adaptive).")
    target_kl: float | None = Field(None, gt=0, description="Adapt β towards this KL (Ziegler et al.); fixed β when unset.")
    max_approx_kl: float | None = Field(
        0.5, gt=0, description="Stop an update epoch early when the approximate KL to the rollout policy exceeds this."
    )
    whiten_rewards: bool = False
    reward_clip: float | None = Field(10.0, gt=0)
    missing_eos_penalty: float | None = Field(
        -1.0, description="Score given to responses with no EOS (null: score them as they are)."
    )
    temperature: float = Field(1.0, gt=0, le=10)
    max_new_tokens: int = Field(8, ge=1, le=8192)
    checkpoint_every: int = Field(10, ge=1, le=1_000_000, description="Save a resumable checkpoint every N steps.")
    lora: LoRA | None = Field(None, description="Train low-rank adapters instead of all policy weights; unset: full.")
    critic_training: Literal["full", "lora", "head"] = Field(
        "full", description="What of the critic is trained: all weights; LoRA adapters (with optimization.lora's "
        "settings) and the value head; or the value head alone on a frozen backbone (no backward pass through it)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass of policy and critic (less memory, ~30% slower)."
    )
    deepspeed: DeepSpeed = Field(default_factory=DeepSpeed)

    @model_validator(mode="after")
    def _critic_lora_has_settings(self) -> Optimization:
        if self.critic_training == "lora" and self.lora is None:
            raise ValueError("criticTraining: lora needs optimization.lora (rank, alpha, targetModules)")
        return self

    @property
    def group_size(self) -> int | None:
        """Samples per prompt of a critic-free algorithm; None for ppo and apa."""
        return {"grpo": self.grpo.group_size, "rloo": self.rloo.group_size}.get(self.algorithm)

    @model_validator(mode="after")
    def _function_reward_has_a_function(self) -> Optimization:
        if self.reward == "function" and self.reward_function is None:
            raise ValueError("reward: function needs optimization.rewardFunction.uri (https://… or python://module:fn)")
        return self

    @model_validator(mode="after")
    def _groups_fill_the_rollout(self) -> Optimization:
        k = self.group_size
        if k is not None and self.rollout_batch_size % k:
            raise ValueError(f"rolloutBatchSize ({self.rollout_batch_size}) must be a multiple of "
                             f"{self.algorithm}.groupSize ({k}): each prompt is sampled groupSize times")
        return self

    @model_validator(mode="after")
    def _minibatch_divides(self) -> Optimization:
        if self.mini_batch_size > self.rollout_batch_size:
            raise ValueError(
                f"miniBatchSize ({self.mini_batch_size}) must not exceed rolloutBatchSize ({self.rollout_batch_size})"
            )
        return self


class Evaluation(SpecModel):
    prompts: DataURI = Field("builtin://arith/eval", description="JSONL of prompts the two policies answer.")
    judge: Annotated[str, StringConstraints(max_length=2048), Matches("^(reward-model|(builtin|reasoning-gym)://[a-z0-9_-]+([?].*)?)$",
                                  "must be reward-model, builtin://TASK or reasoning-gym://TASK (a gold judge)")] = Field(
        "reward-model",
        description="reward-model (the final refined RM), builtin://<task> or reasoning-gym://<task>?<config> "
        "(a programmatic gold judge).",
    )
    max_prompts: int | None = Field(None, ge=1, le=10_000_000)
    temperature: float = Field(1.0, gt=0, le=10)
    greedy: bool = Field(False, description="Greedy decoding instead of sampling at `temperature`.")
    samples_per_prompt: int = Field(
        1, ge=1, le=64, description="Sampled answers per prompt and policy; a prompt's score is their mean."
    )
    max_new_tokens: int = Field(8, ge=1, le=8192)
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of the win-rate's confidence interval.")

    @model_validator(mode="after")
    def _greedy_answers_once(self) -> Evaluation:
        if self.greedy and self.samples_per_prompt > 1:
            raise ValueError("greedy decoding gives the same answer every time: set samplesPerPrompt: 1, or greedy: false")
        return self


class SecretRef(SpecModel):
    name: ObjectName = Field(..., description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.")


class TokenSecretRef(SpecModel):
    name: ObjectName = Field(..., description="Secret holding the Hugging Face token.")
    key: Annotated[str, StringConstraints(min_length=1, max_length=253)] = Field(
        "HF_TOKEN", description="Key of the token in the Secret (exposed as HF_TOKEN).")


class Hub(SpecModel):
    """Access to the Hugging Face Hub for `hf://org/name@revision` model URIs (fetched in the job pod)."""

    endpoint: EndpointURL | None = Field(None, description="Hub or mirror URL (HF_ENDPOINT); default: huggingface.co.")
    secret_ref: TokenSecretRef | None = Field(None, description="Token for gated or private models.")


class Storage(SpecModel):
    """Where phase outputs live (layout: docs/storage.md) and how long S3 trouble is waited out."""

    uri: StorageURI = Field(
        "file://./runs",
        description="Root for checkpoints and phase outputs: s3://bucket/prefix (the bucket must exist), or "
        "file://dir for `rlp run` only.",
    )
    endpoint: EndpointURL | None = Field(None, description="S3 endpoint URL for non-AWS servers.")
    region: Annotated[str, StringConstraints(max_length=64)] | None = None
    secret_ref: SecretRef | None = Field(None, description="Credentials for s3:// (cluster runs).")
    connect_timeout_seconds: float = Field(10.0, gt=0, le=3600, description="S3: give up one connection attempt after this long.")
    read_timeout_seconds: float = Field(
        60.0, gt=0, le=3600, description="S3: give up one request whose server sends nothing for this long."
    )
    retry_seconds: float = Field(
        120.0, ge=0, le=86400,
        description="S3: keep retrying an unreachable, timing-out or 5xx-answering server (with backoff) this long; "
        "an outage shorter than this is ridden out.",
    )
    keep_checkpoints: bool = Field(
        False, description="Keep a phase's resumable checkpoints (_checkpoints/) after it succeeds (default: delete them)."
    )

    def open(self, uri: str | None = None):
        """The `rlp_core.store.Store` at `uri` (default: this storage's root) with these settings."""
        from rlp_core.store import Store  # boto3 is loaded only when a store is opened

        return Store.from_uri(uri or self.uri, endpoint=self.endpoint, region=self.region,
                              timeout=self.read_timeout_seconds, connect_timeout=self.connect_timeout_seconds,
                              retry_seconds=self.retry_seconds)


class Toleration(SpecModel):
    key: Annotated[str, StringConstraints(max_length=317)] | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Resources(SpecModel):
    """Where and how the phase workloads run on a cluster (ignored by `rlp run`)."""

    image: Image = Field("rlp-job:0.1.0", description="Container image of the phase jobs.")
    gpus_per_pod: int = Field(1, ge=0, le=64)
    nodes: int = Field(1, ge=1, le=1024, description="Pods per phase (indexed Job with a headless Service when >1).")
    cpu: Quantity = Field("4", description="CPU request per pod.")
    memory: Quantity = Field("32Gi", description="Memory request per pod.")
    node_selector: dict[Annotated[str, StringConstraints(max_length=317)], LabelValue] = Field(
        default_factory=dict, max_length=64
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    priority_class_name: ObjectName | None = None
    queue: LabelValue | None = Field(None, description="Kueue LocalQueue name (label kueue.x-k8s.io/queue-name).")
    service_account_name: ObjectName | None = None


class PhaseOverride(SpecModel):
    """Per-phase overrides of `resources` (e.g. more nodes for optimize, no GPU for evaluate)."""

    image: Image | None = None
    gpus_per_pod: int | None = Field(None, ge=0, le=64)
    nodes: int | None = Field(None, ge=1, le=1024)
    cpu: Quantity | None = None
    memory: Quantity | None = None
    active_deadline_seconds: int | None = Field(None, ge=1)


class RLPRunSpec(SpecModel):
    policy: Policy = Field(default_factory=Policy)
    reward_model: RewardModel = Field(default_factory=RewardModel)
    prompts: DataURI = Field("builtin://arith/prompts", description="JSONL of {prompt} the policy is sampled on.")
    generation: Generation = Field(default_factory=Generation)
    reward_learning: RewardLearning = Field(default_factory=RewardLearning)
    optimization: Optimization = Field(default_factory=Optimization)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    rounds: int = Field(1, ge=1, le=100)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    batch_memory: Quantity | None = Field(
        None, description="Working memory one chunk of a forward pass may take beyond weights and optimiser state "
        "(activations, KV cache, logits): generation, evaluation, RM scoring, RM training and refinement cut their "
        "batches into chunks estimated to fit it (RM training accumulates micro-batches; refinement checkpoints "
        "gradients). Unset: 1Gi on a CPU, half the free GPU memory on a GPU. Results do not depend on it except "
        "that sampling in other chunks draws other random numbers."
    )
    storage: Storage = Field(default_factory=Storage)
    hub: Hub = Field(default_factory=Hub)
    resources: Resources = Field(default_factory=Resources)
    phases: dict[PhaseName, PhaseOverride] = Field(default_factory=dict)
    backoff_limit: int = Field(
        3,
        ge=1,
        le=100,
        description="Attempts per phase (the first one included) before the run fails; 1: no retry.",
    )
    suspend: bool = False
    ttl_seconds_after_finished: int | None = Field(None, ge=0)

    def phase_plan(self) -> list[tuple[int, str]]:
        """(round, phase) in execution order; round 0 holds the one-off phases before round 1."""
        plan: list[tuple[int, str]] = []
        if self.policy.model is None:
            plan.append((0, "sft"))
        if self.reward_model.model is None:
            plan.append((0, "reward"))
        for k in range(1, self.rounds + 1):
            plan += [(k, name) for name in PHASES_PER_ROUND]
        plan.append((self.rounds, "evaluate"))
        return plan

    def phase_enabled(self, phase: str) -> bool:
        """A phase whose strategy is `none` (or not chosen) is skipped and recorded as skipped."""
        strategy = self.reward_learning.strategy
        if phase == "refine":
            return strategy in ("rlp-uml", "rlp")
        if phase == "synthesize":
            return strategy in ("rlp-spg", "rlp", "ser")
        return True

    def hash(self) -> str:
        """Stable hash of the spec's content; recorded in every manifest."""
        canonical = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Metadata(SpecModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field("quickstart", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=50)
    namespace: str = "default"


class RLPRun(SpecModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, alias_generator=AliasGenerator(alias=to_camel))
    api_version: Literal["rlp.dev/v1alpha1"] = "rlp.dev/v1alpha1"
    kind: Literal["RLPRun"] = "RLPRun"
    metadata: Metadata = Field(default_factory=Metadata)
    spec: RLPRunSpec = Field(default_factory=RLPRunSpec)


class SpecError(ValueError):
    """A spec that fails validation; the message names every bad field by its YAML path."""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid RLPRun ({err.error_count()} problem(s)):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field: check its spelling and camelCase against `rlp crd` or docs/spec.md"
        lines.append(f"  - {path}: {msg}")
    return "\n".join(lines)


def settings_problems(spec: RLPRunSpec) -> tuple[list[str], list[str]]:
    """(errors, warnings) about settings that are valid one by one but do not work together."""
    errors, warnings = [], []
    if spec.policy.model is None:  # the tiny model's context is maxPositions tokens
        room = spec.policy.sft.tiny.max_positions
        for path, n in (("generation.maxNewTokens", spec.generation.max_new_tokens),
                        ("optimization.maxNewTokens", spec.optimization.max_new_tokens),
                        ("evaluation.maxNewTokens", spec.evaluation.max_new_tokens)):
            if n >= room:
                errors.append(f"spec.{path}: {n} leaves no room for the prompt within "
                              f"spec.policy.sft.tiny.maxPositions ({room}); make maxPositions cover the longest "
                              "prompt plus maxNewTokens, or lower maxNewTokens")
    strategy = spec.reward_learning.strategy
    spg = spec.reward_learning.spg
    if (strategy in ("rlp-spg", "rlp") and spg.equivalence == "answer" and spg.answer_pattern is None
            and not spec.evaluation.judge.startswith(("builtin://", "reasoning-gym://"))):
        errors.append("spec.rewardLearning.spg.equivalence: answer needs a way to read the answer; set "
                      "spec.rewardLearning.spg.answerPattern (a regex) or a programmatic spec.evaluation.judge, "
                      "or choose normalized")
    if strategy in ("rlp-spg", "rlp", "ser") and spec.generation.samples_per_prompt < 2:
        warnings.append(f"spec.generation.samplesPerPrompt is 1: {strategy} builds its pairs from several samples "
                        "of the same prompt, so it adds none and the RM trains on human pairs only; set it to 2 or more")
    return errors, warnings


def parse_run(doc: dict[str, Any], source: str = "<spec>") -> RLPRun:
    try:
        run = RLPRun.model_validate(doc)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None
    errors, _ = settings_problems(run.spec)
    if errors:
        raise SpecError("\n".join([f"{source}: invalid RLPRun ({len(errors)} problem(s)):",
                                    *(f"  - {e}" for e in errors)]))
    return run


def load_run(path: str | Path) -> RLPRun:
    """Load an RLPRun YAML (the same file `kubectl apply` takes) or a bare spec JSON (`rlp phase`)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_bytes().decode())
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not UTF-8 text (invalid byte at offset {err.start}); give the RLPRun YAML") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot read: {err.strerror}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: expected a mapping with apiVersion/kind/metadata/spec")
    if "spec" not in doc and "kind" not in doc:
        doc = {"spec": doc}
    return parse_run(doc, str(path))


def _plain_type(tp: Any) -> Any:
    """`tp` without its `Annotated` constraints, for the reference's type column."""
    if typing.get_origin(tp) is Annotated:
        return _plain_type(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, (_plain_type(a) for a in typing.get_args(tp)))
    if typing.get_origin(tp) is dict:
        key, value = typing.get_args(tp)
        return dict[_plain_type(key), _plain_type(value)]
    return tp


_EQUIVALENCE_GUIDE = """
## Which `rewardLearning.spg.equivalence` fits which data

RLP-SPG clusters a prompt's samples by what they answer; the majority cluster is chosen and a minority
one rejected. The clusters must follow the answer, not the phrasing: a chat model writes one answer as
"8 + 5 = 13", "8 + 5 equals 13." and "The answer is 13.".

| data | equivalence | why |
|---|---|---|
| a task with one short answer and a programmatic judge (`builtin://`, `reasoning-gym://`) | `answer` (what `auto` picks) | the judge's own reading of the answer (reasoning-gym: `answer=exact` / `last-number` on the judge URI) clusters replies by answer; it never sees the reference |
| your own data whose answers follow a pattern (GSM8K's `#### 42`, a boxed answer, a label) | `answer` with `answerPattern` | the last match of the regex (its first group when it has one) is the answer |
| short free-form replies (names, labels, single phrases) | `normalized` (what `auto` picks without a reading) | case, articles, whitespace and edge punctuation ignored |
| replies that must match character for character (code, identifiers) | `exact` | |
| open-ended replies (chat, summaries) | `embedding` (extra `embeddings`) | cosine of sentence embeddings ≥ `embeddingThreshold`; paraphrases cluster, different claims do not |

With `answer`, a reply from which no answer can be read is never chosen; it may be rejected.
"""


def reference_markdown() -> str:
    """docs/spec.md: every spec field with its YAML path, default and description (kept current by a test)."""
    rows: list[str] = []

    def walk(obj: SpecModel, prefix: str) -> None:
        for name, info in type(obj).model_fields.items():
            path = f"{prefix}.{info.alias or name}"
            value = getattr(obj, name)
            if isinstance(value, SpecModel):
                walk(value, path)
                continue
            annotation = _plain_type(info.annotation)
            kind = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
            kind = kind or str(annotation).replace("typing.", "").replace("rlp_core.spec.", "")
            default = json.dumps(value, default=lambda m: m.model_dump(by_alias=True))
            rows.append(f"| `{path}` | `{kind}` | `{default}` | {info.description or ''} |")

    walk(RLPRunSpec(), "spec")
    header = ("# RLPRun spec reference\n\nGenerated from `rlp_core/spec.py` (the same model the CRD is generated "
              "from). YAML uses the camelCase names below.\n\n| field | type | default | meaning |\n|---|---|---|---|\n")
    return header + "\n".join(rows) + "\n" + _EQUIVALENCE_GUIDE
