"""The RLPRun CRD: generated from the spec model, committed, structural, and enforced by a real apiserver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from operator_fixtures import RUNS_PATH, install_crd, raw, rlprun

from rlp_core.spec import RLPRunSpec
from rlp_operator.crd import CEL_RULES, LOCKED_FIELDS, MUTABLE_FIELDS, _models_by_name, crd_dict, render_crd
from rlp_operator.status import RLPRunStatus

COMMITTED = Path(__file__).resolve().parents[1] / "crds" / "rlp.dev_rlpruns.yaml"
FORBIDDEN_KEYS = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "propertyNames", "title"}


def test_committed_crd_matches_the_model():
    assert COMMITTED.read_text() == render_crd(), (
        "crds/rlp.dev_rlpruns.yaml is out of date with rlp_core.spec / rlp_operator.status: "
        "run `rlp crd > crds/rlp.dev_rlpruns.yaml` and commit it"
    )


def test_every_spec_field_is_classified_mutable_or_locked():
    fields = {f.alias or n for n, f in RLPRunSpec.model_fields.items()}
    assert set(LOCKED_FIELDS) | set(MUTABLE_FIELDS) == fields
    assert not set(LOCKED_FIELDS) & set(MUTABLE_FIELDS)


def test_every_cross_field_validator_has_a_cel_rule():
    for name, cls in _models_by_name(RLPRunSpec).items():
        validators = cls.__pydantic_decorators__.model_validators
        if validators:
            assert name in CEL_RULES, f"{name} has model validators {list(validators)} but no CEL rule in crd.CEL_RULES"


def _walk(schema, path="$"):
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    version = crd_dict()["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        assert not FORBIDDEN_KEYS & set(node), f"{path} has {FORBIDDEN_KEYS & set(node)}"
        assert "type" in node, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
    spec = root["properties"]["spec"]
    assert spec["properties"]["optimization"]["properties"]["algorithm"]["enum"] == ["ppo", "apa", "grpo", "rloo"]
    assert spec["properties"]["rounds"]["minimum"] == 1
    assert spec["properties"]["storage"]["properties"]["secretRef"]["required"] == ["name"]
    assert spec["properties"]["policy"]["properties"]["model"]["nullable"] is True
    assert set(spec["properties"]["phases"]["properties"]) == {
        "sft", "reward", "generate", "refine", "synthesize", "optimize", "evaluate"
    }  # fmt: skip
    # default_factory defaults that differ from the nested model's own defaults are spelled out
    sft = spec["properties"]["policy"]["properties"]["sft"]["properties"]["training"]
    assert sft["default"] == {"epochs": 6.0, "batchSize": 64, "learningRate": 0.003}
    status = root["properties"]["status"]
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    metrics = status["properties"]["phases"]["items"]["properties"]["metrics"]
    assert metrics["x-kubernetes-preserve-unknown-fields"] is True
    assert set(status["properties"]) == {f.alias or n for n, f in RLPRunStatus.model_fields.items()}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Current", "Round", "Age", "Message"]
    assert version["subresources"] == {"status": {}}
    assert crd_dict()["spec"]["names"]["shortNames"] == ["rlp"]


def _largest_json(node) -> int:
    """Bytes of the largest JSON value the schema admits (every string, list and map at its bound)."""
    if "enum" in node:
        return max(len(json.dumps(v)) for v in node["enum"])
    kind = node["type"]
    if kind == "string":
        return node["maxLength"] * 6 + 2  # worst case: every character escaped as \uXXXX
    if kind in ("integer", "number"):
        return 24
    if kind == "boolean":
        return 5
    if kind == "array":
        return 2 + node["maxItems"] * (_largest_json(node["items"]) + 1)
    if "additionalProperties" in node:  # a map: its keys are bounded by a CEL rule
        key = int(next(r["rule"].split("<= ")[1].rstrip(")") for r in node["x-kubernetes-validations"]
                       if r["rule"].startswith("self.all(k, k.size()")))  # fmt: skip
        return 2 + node["maxProperties"] * (key * 6 + 4 + _largest_json(node["additionalProperties"]))
    return 2 + sum(len(k) + 4 + _largest_json(v) for k, v in node["properties"].items())


def test_the_largest_spec_the_crd_admits_fits_its_configmap():
    """Every string, list and map of the spec is bounded (a KeyError here names an unbounded one), so a run
    the apiserver admits always fits its `<run>-spec` ConfigMap (at most 1 MiB)."""
    spec = crd_dict()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert _largest_json(spec) < 1024 * 1024 // 2  # the ConfigMap holds the spec indented: room for it


def test_rendered_yaml_round_trips():
    assert yaml.safe_load(render_crd()) == crd_dict()


# ---- against the real apiserver ------------------------------------------------------------------


@pytest.fixture
def crd(kube_api):
    install_crd(kube_api)
    return kube_api


# The least a cluster run needs: S3 storage (file:// is refused on a cluster).
S3 = {"storage": {"uri": "s3://rlp-test/runs"}}


def _create(api, ns, body, query="fieldValidation=Strict"):
    return raw(api, "POST", RUNS_PATH.format(ns=ns), body, query=query)


def test_apiserver_fills_in_the_same_defaults_as_pydantic(crd, namespace):
    status, obj = _create(crd, namespace, rlprun("defaults", S3))
    assert status == 201, obj
    expected = RLPRunSpec.model_validate(S3).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert obj["spec"] == expected
    # and with a partial spec: nested defaults under a given object
    partial = {**S3, "optimization": {"algorithm": "apa"}, "rounds": 2}
    status, obj = _create(crd, namespace, rlprun("partial", partial))
    assert status == 201, obj
    expected = RLPRunSpec.model_validate(partial)
    assert obj["spec"] == expected.model_dump(mode="json", by_alias=True, exclude_none=True)


INVALID = [
    ({"rounds": 0}, "spec.rounds"),
    ({"optimization": {"algorithm": "dpo"}}, "spec.optimization.algorithm"),
    ({"rewardLearning": {"strategy": "magic"}}, "spec.rewardLearning.strategy"),
    ({"generation": {"topP": 0}}, "spec.generation.topP"),
    ({"optimization": {"miniBatchSize": 64, "rolloutBatchSize": 8}}, "spec.optimization.miniBatchSize"),
    ({"optimization": {"algorithm": "grpo", "rolloutBatchSize": 30, "miniBatchSize": 10}}, "spec.optimization.rolloutBatchSize"),
    ({"optimization": {"algorithm": "rloo", "rolloutBatchSize": 9, "miniBatchSize": 9, "rloo": {"groupSize": 2}}},
     "spec.optimization.rolloutBatchSize"),
    ({"optimization": {"algorithm": "grpo", "grpo": {"groupSize": 1}}}, "spec.optimization.grpo.groupSize"),
    ({"policy": {"chatTemplate": "none", "systemPrompt": "You are a calculator."}}, "spec.policy.systemPrompt"),
    ({"optimization": {"reward": "function"}}, "spec.optimization.rewardFunction"),
    ({"optimization": {"reward": "function", "rewardFunction": {"uri": "ftp://x"}}}, "spec.optimization.rewardFunction.uri"),
    ({"rewardLearning": {"ser": {"lowConfidence": 0.95, "highConfidence": 0.9}}}, "spec.rewardLearning.ser.lowConfidence"),
    ({"policy": {"sft": {"tiny": {"hiddenSize": 65, "numHeads": 4}}}}, "spec.policy.sft.tiny.hiddenSize"),
    ({"evaluation": {"greedy": True, "samplesPerPrompt": 4}}, "spec.evaluation.samplesPerPrompt"),
    ({"storage": {"secretRef": {}}}, "spec.storage.secretRef.name"),
    ({"resources": {"gpusPerPod": -1}}, "spec.resources.gpusPerPod"),
    ({"phases": {"optimize": {"nodes": 0}}}, "spec.phases.optimize.nodes"),
    ({"backoffLimit": "three"}, "spec.backoffLimit"),
    ({"optimizaton": {}}, "optimizaton"),  # a typo: strict field validation names it
    ({"phases": {"optimise": {}}}, "optimise"),
    # what the Job, the store or a phase would only find out later (issue #13)
    ({"resources": {"memory": "lots"}}, "spec.resources.memory"),
    ({"resources": {"cpu": "-4"}}, "spec.resources.cpu"),
    ({"phases": {"evaluate": {"memory": "16 Gi"}}}, "spec.phases.evaluate.memory"),
    ({"resources": {"image": ""}}, "spec.resources.image"),
    ({"storage": {"uri": "s3://rlp-test/runs", "endpoint": "not a url"}}, "spec.storage.endpoint"),
    ({"storage": {"uri": "s3://Bad_Bucket!!/x"}}, "spec.storage.uri"),
    ({"storage": {"uri": "file://./runs"}}, "spec.storage.uri"),
    ({"storage": {}}, "spec.storage.uri"),  # as `spec: {}`: the default file://./runs is for `rlp run` only
    ({"prompts": "http://example.com/prompts.jsonl"}, "spec.prompts"),
    ({"rewardModel": {"humanPreferences": "data/prefs.jsonl"}}, "spec.rewardModel.humanPreferences"),
    ({"policy": {"model": "/models/sft"}}, "spec.policy.model"),
    ({"evaluation": {"judge": "gpt-4"}}, "spec.evaluation.judge"),
    ({"optimization": {"steps": 10**15}}, "spec.optimization.steps"),
    ({"resources": {"priorityClassName": "High Priority"}}, "spec.resources.priorityClassName"),
    ({"resources": {"nodeSelector": {f"k{i}": "v" for i in range(65)}}}, "spec.resources.nodeSelector"),
    ({"evaluation": {"prompts": "s3://rlp-test/" + "x" * 3000}}, "spec.evaluation.prompts"),
]  # fmt: skip


@pytest.mark.parametrize("spec,field", INVALID, ids=[f for _, f in INVALID])
def test_invalid_runs_are_rejected_naming_the_field(crd, namespace, spec, field):
    status, obj = _create(crd, namespace, rlprun("bad", {**S3, **spec}))
    assert status in (400, 422), obj  # 400: strict decoding of an unknown field; 422: schema validation
    assert field in obj["message"], obj["message"]


def test_an_empty_spec_is_refused_on_a_cluster_and_nulls_pass(crd, namespace):
    """`rlp run` defaults to file:// storage; on a cluster that would be the operator's own disk."""
    for name, body in (("empty", rlprun("empty", {})), ("nospec", {**rlprun("nospec", {}), "spec": None})):
        status, obj = _create(crd, namespace, {k: v for k, v in body.items() if v is not None})
        assert status == 422 and "spec.storage.uri" in obj["message"] and "s3://" in obj["message"], obj
    nulls = {**S3, "policy": {"model": None}, "storage": {**S3["storage"], "endpoint": None}}
    status, obj = _create(crd, namespace, rlprun("nulls", nulls))
    assert status == 201, obj


def test_long_run_name_is_rejected(crd, namespace):
    status, obj = _create(crd, namespace, rlprun("r" * 51, S3))
    assert status == 422 and "metadata.name" in obj["message"], obj


def test_training_fields_are_immutable_and_scheduling_fields_are_not(crd, namespace):
    status, obj = _create(crd, namespace, rlprun("imm", S3))
    assert status == 201, obj
    path = RUNS_PATH.format(ns=namespace) + "/imm"
    status, obj = raw(crd, "PATCH", path, {"spec": {"rounds": 3}}, content_type="application/merge-patch+json")
    assert status == 422 and "spec.rounds" in obj["message"] and "immutable" in obj["message"], obj
    status, obj = raw(crd, "PATCH", path, {"spec": {"optimization": {"steps": 7}}},
                      content_type="application/merge-patch+json")  # fmt: skip
    assert status == 422 and "spec.optimization" in obj["message"], obj
    patch = {"spec": {"suspend": True, "backoffLimit": 5, "resources": {"image": "x:2"}, "ttlSecondsAfterFinished": 60,
                      "phases": {"optimize": {"nodes": 2}}}}  # fmt: skip
    status, obj = raw(crd, "PATCH", path, patch, content_type="application/merge-patch+json")
    assert status == 200, obj
    assert obj["metadata"]["generation"] == 2


def test_printer_columns_and_short_name(crd, namespace):
    status, obj = _create(crd, namespace, rlprun("cols", S3))
    assert status == 201
    path = RUNS_PATH.format(ns=namespace) + "/cols/status"
    status, obj = raw(crd, "PATCH", path, {"status": {"phase": "Running", "currentPhase": "optimize", "round": 2,
                                                      "message": "optimize (round 2) attempt 1"}},
                      content_type="application/merge-patch+json")  # fmt: skip
    assert status == 200, obj
    status, table = raw(crd, "GET", RUNS_PATH.format(ns=namespace),
                        accept="application/json;as=Table;v=v1;g=meta.k8s.io")  # fmt: skip
    assert status == 200, table
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names == ["Name", "Phase", "Current", "Round", "Age", "Message"]
    row = table["rows"][0]["cells"]
    assert row[:4] == ["cols", "Running", "optimize", 2] and row[5] == "optimize (round 2) attempt 1"
    status, resources = raw(crd, "GET", "/apis/rlp.dev/v1alpha1")
    rlpruns = next(r for r in resources["resources"] if r["name"] == "rlpruns")
    assert rlpruns["shortNames"] == ["rlp"]
