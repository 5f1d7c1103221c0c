"""The RLPRun CustomResourceDefinition, generated from the shared pydantic models.

`render_crd()` is what `rlp crd` prints and what `crds/rlp.dev_rlpruns.yaml` holds (a test fails when they
differ). The spec schema comes from `RLPRun.model_json_schema(by_alias=True)`, turned into a structural
OpenAPI v3 schema:

* `$ref`s are inlined; `anyOf [X, null]` becomes `X` with `nullable: true`;
* defaults are kept, including those made by a `default_factory` (the factory's value, so the apiserver
  fills in exactly what pydantic would), with `null`s left out;
* JSON-Schema-2020 `exclusiveMinimum: x` becomes OpenAPI's `minimum: x, exclusiveMinimum: true`;
* `dict[Literal[...], X]` (``spec.phases``) becomes an object with one optional property per key;
* every pydantic `model_validator` (a rule across fields) has a CEL rule in `CEL_RULES`;
* fields that define what is trained are immutable (`self == oldSelf`); see `LOCKED_FIELDS`.

The status schema comes from `rlp_operator.status`.
"""

from __future__ import annotations

import copy
import typing
from typing import Any

import yaml
from pydantic import BaseModel

from rlp_core.spec import API_GROUP, API_VERSION, KIND, RLPRun, RLPRunSpec
from rlp_operator.status import RLPRunStatus

PLURAL = "rlpruns"
SINGULAR = "rlprun"
SHORT_NAMES = ["rlp"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"

# Spec fields (camelCase) that may not change while the run exists: they define what is trained and
# where its outputs live, and completed phases were produced from them. Everything else may change
# mid-run; see docs/operator.md.
LOCKED_FIELDS: tuple[str, ...] = (
    "policy",
    "rewardModel",
    "prompts",
    "generation",
    "rewardLearning",
    "optimization",
    "evaluation",
    "rounds",
    "seed",
    "storage",
)
MUTABLE_FIELDS: tuple[str, ...] = (
    "resources", "phases", "backoffLimit", "suspend", "ttlSecondsAfterFinished",
    "hub",  # access to the Hub (endpoint, token) may change; what is fetched is pinned by the model URI
    "batchMemory",  # how batches are cut, not what is trained: a phase killed for memory is retried with less
)

IMMUTABLE_MESSAGE = (
    "is immutable while the run exists (it defines what is trained); create a new RLPRun to change it"
)

# CEL counterparts of the pydantic model validators, by model class name. The `has()` guards are for the
# apiserver's check of the schema's own (not yet nested-defaulted) `default: {}` values; real objects are
# defaulted before validation, so both fields are always there.
CEL_RULES: dict[str, list[dict[str, str]]] = {
    "TinyModel": [
        {
            "rule": "!has(self.hiddenSize) || !has(self.numHeads) || self.hiddenSize % self.numHeads == 0",
            "message": "hiddenSize must be a multiple of numHeads",
            "fieldPath": ".hiddenSize",
        }
    ],
    "Policy": [
        {
            "rule": "!has(self.systemPrompt) || !has(self.chatTemplate) || self.chatTemplate != 'none'",
            "message": "systemPrompt needs chatTemplate: auto (plain-text prompts have no system message)",
            "fieldPath": ".systemPrompt",
        }
    ],
    "SER": [
        {
            "rule": "!has(self.lowConfidence) || !has(self.highConfidence) || self.lowConfidence <= self.highConfidence",
            "message": "lowConfidence must not exceed highConfidence",
            "fieldPath": ".lowConfidence",
        }
    ],
    "Optimization": [
        {
            "rule": "!has(self.reward) || self.reward != 'function' || has(self.rewardFunction)",
            "message": "reward: function needs optimization.rewardFunction.uri (https://… or python://module:fn)",
            "fieldPath": ".rewardFunction",
        },
        {
            "rule": "!has(self.miniBatchSize) || !has(self.rolloutBatchSize) || self.miniBatchSize <= self.rolloutBatchSize",
            "message": "miniBatchSize must not exceed rolloutBatchSize",
            "fieldPath": ".miniBatchSize",
        },
        {
            "rule": "!has(self.algorithm) || !has(self.rolloutBatchSize) || !has(self.grpo) || !has(self.grpo.groupSize)"
                    " || self.algorithm != 'grpo' || self.rolloutBatchSize % self.grpo.groupSize == 0",
            "message": "rolloutBatchSize must be a multiple of grpo.groupSize: each prompt is sampled groupSize times",
            "fieldPath": ".rolloutBatchSize",
        },
        {
            "rule": "!has(self.algorithm) || !has(self.rolloutBatchSize) || !has(self.rloo) || !has(self.rloo.groupSize)"
                    " || self.algorithm != 'rloo' || self.rolloutBatchSize % self.rloo.groupSize == 0",
            "message": "rolloutBatchSize must be a multiple of rloo.groupSize: each prompt is sampled groupSize times",
            "fieldPath": ".rolloutBatchSize",
        },
    ],
    "Evaluation": [
        {
            "rule": "!has(self.greedy) || !self.greedy || !has(self.samplesPerPrompt) || self.samplesPerPrompt == 1",
            "message": "greedy decoding gives the same answer every time: set samplesPerPrompt: 1, or greedy: false",
            "fieldPath": ".samplesPerPrompt",
        }
    ],
}

ROOT_RULES = [
    {
        "rule": "self.metadata.name.size() <= 50 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
        "message": "metadata.name must be a DNS label of at most 50 characters (it prefixes Job and Service names)",
    }
]

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "State of the run."},
    {"name": "Current", "type": "string", "jsonPath": ".status.currentPhase", "description": "Phase running now."},
    {"name": "Round", "type": "integer", "jsonPath": ".status.round", "description": "Round of the current phase."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "description": "What is happening."},
]

_DROP_KEYS = {"title", "additionalProperties", "propertyNames", "$defs", "$ref", "anyOf", "const"}
# String rules of the spec model (`rlp_core.spec.Matches`). `x-rlp-match` is enforced everywhere and
# becomes a rule on the field. `x-rlp-cluster-match` is enforced only here (what a job pod cannot read,
# such as local paths); its rule goes on the enclosing object, guarded by `has()`, because the apiserver
# checks each field's own default against the field's rules and `rlp run`'s default (file://) must stay.
_MATCH = "x-rlp-match"
_CLUSTER_MATCH = "x-rlp-cluster-match"


def _match_rule(match: dict[str, str], field: str | None = None) -> dict[str, str]:
    """A `Matches` rule as CEL (on `self`, or on `self.<field>` of an object); its pattern has no quote or
    backslash, so it needs no escaping."""
    pattern = match["pattern"]
    if "'" in pattern or "\\" in pattern:
        raise ValueError(f"pattern {pattern!r} must not contain quotes or backslashes (it is written into CEL)")
    if field is None:
        return {"rule": f"self.matches('{pattern}')", "message": match["message"]}
    return {"rule": f"!has(self.{field}) || self.{field}.matches('{pattern}')", "message": match["message"],
            "fieldPath": f".{field}"}  # fmt: skip


def _models_by_name(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every pydantic model reachable from `root` through field annotations, by class name."""
    found: dict[str, type[BaseModel]] = {}

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp.__name__ in found:
                return
            found[tp.__name__] = tp
            for field in tp.model_fields.values():
                visit(field.annotation)
            return
        for arg in typing.get_args(tp):
            visit(arg)

    visit(root)
    return found


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def _diff(value: Any, baseline: Any) -> Any:
    """The part of `value` that differs from `baseline` (nested dicts compared key by key)."""
    out = {}
    for k, v in value.items():
        b = baseline.get(k)
        if isinstance(v, dict) and isinstance(b, dict):
            sub = _diff(v, b)
            if sub:
                out[k] = sub
        elif k not in baseline or v != b:
            out[k] = v
    return out


def _dump_default(value: Any) -> Any:
    """The smallest default that makes the apiserver produce the factory's value.

    The apiserver defaults nested fields of a defaulted object from their own schemas, so a model made
    by a plain `default_factory=Model` needs only `{}`, and `Training(epochs=6, ...)` only the fields
    that differ from `Training()`.
    """
    if isinstance(value, BaseModel):
        dumped = _strip_none(value.model_dump(mode="json", by_alias=True))
        try:
            baseline = _strip_none(type(value)().model_dump(mode="json", by_alias=True))
        except Exception:  # a model with required fields: spell the default out
            return dumped
        return _diff(dumped, baseline)
    return _strip_none(value)


class _Converter:
    def __init__(self, root: type[BaseModel], defs: dict[str, Any]):
        self.models = _models_by_name(root)
        self.defs = defs

    def model(self, cls: type[BaseModel], schema: dict[str, Any]) -> dict[str, Any]:
        out = self.node(schema)
        props = out.get("properties", {})
        for name, field in cls.model_fields.items():
            alias = field.alias or name
            if alias not in props:
                continue
            if field.default_factory is not None:
                default = _dump_default(field.default_factory())  # type: ignore[call-arg]
                props[alias]["default"] = default
            if "default" in props[alias] and props[alias]["default"] is None:
                del props[alias]["default"]
        rules = copy.deepcopy(CEL_RULES.get(cls.__name__, []))
        for alias, prop in props.items():
            if _CLUSTER_MATCH in prop:
                rules.append(_match_rule(prop.pop(_CLUSTER_MATCH), alias))
        if rules:
            out["x-kubernetes-validations"] = rules
        return out

    def node(self, schema: dict[str, Any]) -> dict[str, Any]:
        schema = dict(schema)
        # `$ref` (possibly with sibling keys such as description): inline the referenced model.
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            target = self.model(self.models[name], self.defs[name])
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            return {**target, **self.node_plain(siblings)} if siblings else target
        if "allOf" in schema and len(schema["allOf"]) == 1:
            inner = self.node(schema["allOf"][0])
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return {**inner, **self.node_plain(rest)}
        if "anyOf" in schema:
            options = [o for o in schema["anyOf"] if o.get("type") != "null"]
            nullable = len(options) < len(schema["anyOf"])
            if len(options) != 1:
                raise ValueError(f"cannot express anyOf {schema['anyOf']} in a structural schema")
            inner = self.node(options[0])
            rest = {k: v for k, v in schema.items() if k != "anyOf"}
            merged = {**inner, **self.node_plain(rest)}
            if nullable:
                merged["nullable"] = True
            return merged
        return self.node_plain(schema)

    def node_plain(self, schema: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key in _DROP_KEYS:
                continue
            if key == _MATCH:
                out.setdefault("x-kubernetes-validations", []).append(_match_rule(value))
                continue
            if key == "properties":
                out["properties"] = {k: self.node(v) for k, v in value.items()}
            elif key == "items":
                out["items"] = self.node(value)
            elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                out[bound] = value
                out[key] = True
            else:
                out[key] = value
        if "const" in schema:
            out["enum"] = [schema["const"]]
        if "propertyNames" in schema and "enum" in schema["propertyNames"]:
            # dict[Literal[...], X]: one optional property per allowed key
            value_schema = self.node(schema["additionalProperties"])
            out["properties"] = {k: copy.deepcopy(value_schema) for k in schema["propertyNames"]["enum"]}
        elif isinstance(schema.get("additionalProperties"), dict):
            extra = schema["additionalProperties"]
            if extra:
                out["additionalProperties"] = self.node(extra)
            else:  # dict[str, Any]
                out["x-kubernetes-preserve-unknown-fields"] = True
            key_limit = (schema.get("propertyNames") or {}).get("maxLength")
            if key_limit is not None:  # OpenAPI has no propertyNames: a CEL rule bounds the keys
                out.setdefault("x-kubernetes-validations", []).append(
                    {"rule": f"self.all(k, k.size() <= {key_limit})", "message": f"keys must be at most {key_limit} characters"}
                )
        if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
            out["x-kubernetes-preserve-unknown-fields"] = True
        return out


_KEY_ORDER = [
    "type", "format", "description", "default", "enum", "nullable",
    "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "minLength", "maxLength", "pattern",
    "minItems", "maxItems", "required", "properties", "additionalProperties", "items",
]  # fmt: skip


def _ordered(schema: Any) -> Any:
    """Stable, readable key order (type and description first, x-kubernetes-* last); data kept as is."""
    if not isinstance(schema, dict):
        return schema
    rank = {k: i for i, k in enumerate(_KEY_ORDER)}
    out = {}
    for key in sorted(schema, key=lambda k: (rank.get(k, len(rank)), k)):
        value = schema[key]
        if key == "properties":
            value = {name: _ordered(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            value = _ordered(value)
        out[key] = value
    return out


def _schema_of(cls: type[BaseModel]) -> dict[str, Any]:
    raw = cls.model_json_schema(by_alias=True, mode="validation")
    conv = _Converter(cls, raw.get("$defs", {}))
    return conv.model(cls, raw)


def _drop_defaults(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _drop_defaults(v) for k, v in schema.items() if k != "default"}
    if isinstance(schema, list):
        return [_drop_defaults(v) for v in schema]
    return schema


def spec_schema() -> dict[str, Any]:
    schema = _schema_of(RLPRunSpec)
    props = schema["properties"]
    missing = set(props) - set(LOCKED_FIELDS) - set(MUTABLE_FIELDS)
    if missing:
        raise AssertionError(f"spec fields {sorted(missing)} are neither LOCKED_FIELDS nor MUTABLE_FIELDS")
    for name in LOCKED_FIELDS:
        props[name].setdefault("x-kubernetes-validations", []).append(
            {"rule": "self == oldSelf", "message": IMMUTABLE_MESSAGE}
        )
    schema["description"] = "What to train and how: one spec for `rlp run`, `rlp phase` and the operator."
    return schema


def status_schema() -> dict[str, Any]:
    schema = _schema_of(RLPRunStatus)
    props = schema["properties"]
    props["conditions"]["x-kubernetes-list-type"] = "map"
    props["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    props["phases"]["x-kubernetes-list-type"] = "atomic"
    schema = _drop_defaults(schema)  # status is written by the operator; no defaulting
    schema["description"] = "Written by the operator: run state, per-phase records, conditions."
    return schema


def crd_dict() -> dict[str, Any]:
    version_schema = {
        "type": "object",
        "description": f"{KIND}: one RLHF run (reward learning on policy), executed as one Job per phase.",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _ordered({**spec_schema(), "default": {}}),
            "status": _ordered(status_schema()),
        },
        "x-kubernetes-validations": copy.deepcopy(ROOT_RULES),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "rlp", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["rlp"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": version_schema},
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def render_crd() -> str:
    """The CRD as YAML text (what `rlp crd` prints and `crds/rlp.dev_rlpruns.yaml` holds)."""
    header = (
        "# Generated by `rlp crd` from rlp_core.spec and rlp_operator.status. Do not edit by hand:\n"
        "# change the models, then run `rlp crd > crds/rlp.dev_rlpruns.yaml`.\n"
    )
    body = yaml.dump(crd_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
    return header + body


__all__ = ["render_crd", "crd_dict", "LOCKED_FIELDS", "MUTABLE_FIELDS", "CEL_RULES", "RLPRun"]
