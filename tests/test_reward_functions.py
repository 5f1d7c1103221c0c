"""User rewards (rlp_core.reward_functions) against a real local HTTP server: success, batching, the bearer
token, a slow server (timeout, then retried), 500s (retried with backoff, then a clear error), malformed JSON
and wrong counts; a Python function; and a run whose optimize phase is driven by each."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlp_core.context import PhaseError
from rlp_core.reward_functions import user_reward
from rlp_core.spec import RewardFunction
from rlp_core.tasks import TASKS


class RewardServer:
    """A real HTTP server on loopback; `behaviour` decides each answer: "ok", "slow", "500", "junk", "short"."""

    def __init__(self):
        self.behaviour: list[str] = []  # consumed one per request; "ok" once empty
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                mode = server.behaviour.pop(0) if server.behaviour else "ok"
                if mode == "slow":
                    time.sleep(1.5)
                if mode == "500":
                    return self._send(500, b"overloaded")
                if mode == "junk":
                    return self._send(200, b"<html>not json</html>")
                rewards = [TASKS["arith"].gold_score(p, r) for p, r in zip(body["prompts"], body["responses"])]
                self._send(200, json.dumps({"rewards": rewards[:-1] if mode == "short" else rewards}).encode())

            def _send(self, code, payload):
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except BrokenPipeError:  # the client timed out on a slow answer and hung up
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    srv = RewardServer()
    yield srv
    srv.httpd.shutdown()


PROMPTS, RESPONSES = ["1+2=", "3+4=", "2+2="], ["3", "8", "4+"]
EXPECTED = [1.0, 0.25, 0.5]  # exact; off by one: 0.5 / 2; right but sloppy: halved


def test_endpoint_scores_in_batches_with_the_bearer_token(server, monkeypatch):
    monkeypatch.setenv("RLP_REWARD_TOKEN", "s3cret")
    reward = user_reward(RewardFunction(uri=server.url, batch_size=2))
    assert reward(PROMPTS, RESPONSES) == EXPECTED
    assert [len(r["responses"]) for r in server.requests] == [2, 1]
    assert server.requests[0]["query"] == ["1+2=3", "3+4=8"]  # OpenRLHF's field: prompt + response
    assert server.headers[0]["Authorization"] == "Bearer s3cret"


def test_slow_and_failing_answers_are_retried(server):
    server.behaviour = ["slow", "500", "500"]
    reward = user_reward(RewardFunction(uri=server.url, timeout_seconds=0.5, retries=3))
    t0 = time.monotonic()
    assert reward(PROMPTS, RESPONSES) == EXPECTED
    assert len(server.requests) == 4 and time.monotonic() - t0 >= 0.5 + 0.5 + 1.0  # the timeout, then backoff


def test_what_still_fails_names_the_field_and_the_fix(server):
    cases = [(["500"] * 3, "answered HTTP 500 after 2 retries"), (["slow"] * 3, "did not answer after 2 retries"),
             (["junk"], "it must answer JSON"), (["short"], "gave 2 values for 3 responses")]
    for behaviour, message in cases:
        server.behaviour = list(behaviour)
        reward = user_reward(RewardFunction(uri=server.url, timeout_seconds=0.5, retries=2))
        with pytest.raises(PhaseError, match=message) as err:
            reward(PROMPTS, RESPONSES)
        assert "spec.optimization.rewardFunction.uri" in str(err.value)
    dead = user_reward(RewardFunction(uri="http://127.0.0.1:9/score", retries=0))  # nothing listens on port 9
    with pytest.raises(PhaseError, match="did not answer"):
        dead(PROMPTS, RESPONSES)


def test_python_function_reward(tmp_path, monkeypatch):
    (tmp_path / "team_rewards.py").write_text(
        "def exact(prompts, responses):\n    return [float(r == str(eval(p[:-1]))) for p, r in zip(prompts, responses)]\n"
        "def broken(prompts, responses):\n    return [float('nan')] * len(responses)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert user_reward(RewardFunction(uri="python://team_rewards:exact"))(PROMPTS, RESPONSES) == [1.0, 0.0, 0.0]
    with pytest.raises(PhaseError, match="rewards must be finite numbers"):
        user_reward(RewardFunction(uri="python://team_rewards:broken"))(PROMPTS, RESPONSES)
    with pytest.raises(PhaseError, match="has no function 'missing'"):
        user_reward(RewardFunction(uri="python://team_rewards:missing"))
    with pytest.raises(PhaseError, match="cannot import no_such_pkg"):
        user_reward(RewardFunction(uri="python://no_such_pkg.mod:fn"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["http", "python"])
def test_a_run_is_optimised_against_a_user_reward(kind, server, tiny_sft_dir, tmp_path, monkeypatch):
    """The optimize phase (GRPO, no reward model at all) driven by the endpoint or the function: it calls
    it for every rollout and the policy's reward under it goes up."""
    from rlp_core.pipeline import execute_phase
    from rlp_core.spec import parse_run
    from rlp_core.store import Store

    (tmp_path / "gold_reward.py").write_text(
        "from rlp_core.tasks import TASKS\n"
        "def score(prompts, responses):\n"
        "    return [TASKS['arith'].gold_score(p, r) for p, r in zip(prompts, responses)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    uri = server.url if kind == "http" else "python://gold_reward:score"
    run = parse_run({"metadata": {"name": f"user-reward-{kind}"}, "spec": {
        "policy": {"model": f"file://{tiny_sft_dir}"},
        "rewardLearning": {"strategy": "none"},
        "optimization": {"algorithm": "grpo", "reward": "function", "rewardFunction": {"uri": uri, "batchSize": 16},
                         "steps": 30, "rolloutBatchSize": 32, "miniBatchSize": 16, "learningRate": 0.001,
                         "klCoef": 0.02, "maxNewTokens": 4, "missingEosPenalty": 0.0},
    }})
    store = Store.from_uri(f"file://{tmp_path}/store")
    result = execute_phase(run, store, 1, "optimize", cache_dir=tmp_path / "cache")
    assert result.state == "Succeeded", result
    metrics = result.manifest.metrics
    assert metrics["reward"] == "function" and metrics["value_init"] is None
    assert metrics["reward_mean_last"] > metrics["reward_mean_first"] + 0.05, metrics
    if kind == "http":
        assert len(server.requests) == 30 * 2  # 32 responses per rollout, 16 per request
