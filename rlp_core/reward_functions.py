"""Your own reward (`optimization.reward: function`): an HTTP endpoint or a Python function.

HTTP (`rewardFunction.uri: https://…`) speaks OpenRLHF's remote reward protocol, so a reward server
written for OpenRLHF's `--remote_rm_url` works unchanged: each batch of `batchSize` responses is POSTed as
JSON `{"query": [prompt + response, …], "prompts": […], "responses": […]}` and answered with
`{"rewards": [float, …]}` in the same order. Connection errors, timeouts (`timeoutSeconds` per request),
429 and 5xx answers are retried `retries` times with exponential backoff (urllib3's Retry: 0.5 s, 1 s,
2 s, …); what is still failing then, and any answer that is not that JSON, stops the phase with an error
naming `optimization.rewardFunction.uri` (the optimize phase resumes from its last checkpoint when rerun).
A bearer token, when set, comes from the environment (`RLP_REWARD_TOKEN`, from `tokenSecretRef` on the
cluster) and is never logged.

Python (`python://package.module:function`): `function(prompts, responses)` returns one float per
response. The module must be importable where the phase runs: locally, installed in rlp's environment;
on the cluster, in your image built `FROM` the rlp-job image (`RUN uv pip install --python
/opt/rlp/venv/bin/python your-package`, or `COPY` the module onto its PYTHONPATH).
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Sequence

import requests
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from rlp_core.context import PhaseError
from rlp_core.spec import RewardFunction

FIELD = "spec.optimization.rewardFunction.uri"
TOKEN_ENV = "RLP_REWARD_TOKEN"
Reward = Callable[[list[str], list[str]], list[float]]


def user_reward(cfg: RewardFunction) -> Reward:
    """(prompts, responses) -> rewards, batched by `cfg.batch_size`, from the endpoint or function `cfg.uri`."""
    one_batch = _python_function(cfg.uri) if cfg.uri.startswith("python://") else _http_endpoint(cfg)

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(responses), cfg.batch_size):
            ps, rs = prompts[start : start + cfg.batch_size], responses[start : start + cfg.batch_size]
            out += _checked(one_batch(ps, rs), len(rs), cfg.uri)
        return out

    return reward


def _checked(rewards: object, n: int, uri: str) -> list[float]:
    if not isinstance(rewards, Sequence) or isinstance(rewards, str | bytes) or len(rewards) != n:
        got = f"{len(rewards)} values" if isinstance(rewards, Sequence) else type(rewards).__name__
        raise PhaseError(f"{FIELD}: {uri} gave {got} for {n} responses; it must give one number per response")
    values = []
    for i, value in enumerate(rewards):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise PhaseError(f"{FIELD}: {uri} gave {value!r} as reward {i}; rewards must be finite numbers")
        values.append(float(value))
    return values


def _python_function(uri: str) -> Callable[[list[str], list[str]], object]:
    module_name, _, name = uri.removeprefix("python://").partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PhaseError(f"{FIELD}: cannot import {module_name} ({err}); install it where the phase runs (on the "
                         "cluster: an image built FROM rlp-job, see rlp_core.reward_functions)") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise PhaseError(f"{FIELD}: {module_name} has no function {name!r}")
    return function


def _http_endpoint(cfg: RewardFunction) -> Callable[[list[str], list[str]], object]:
    session = requests.Session()
    retry = Retry(total=cfg.retries, connect=cfg.retries, read=cfg.retries, status=cfg.retries, other=0,
                  backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504), allowed_methods={"POST"},
                  raise_on_status=False, respect_retry_after_header=True)
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    headers = {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"} if os.environ.get(TOKEN_ENV) else {}

    def post(prompts: list[str], responses: list[str]) -> object:
        body = {"query": [p + r for p, r in zip(prompts, responses)], "prompts": prompts, "responses": responses}
        try:
            reply = session.post(cfg.uri, json=body, headers=headers, timeout=cfg.timeout_seconds)
        except requests.RequestException as err:
            raise PhaseError(f"{FIELD}: {cfg.uri} did not answer after {cfg.retries} retries "
                             f"({type(err).__name__}; timeoutSeconds {cfg.timeout_seconds:g})") from None
        if reply.status_code != 200:
            raise PhaseError(f"{FIELD}: {cfg.uri} answered HTTP {reply.status_code} after {cfg.retries} retries: "
                             f"{reply.text[:200]!r}")
        try:
            return reply.json()["rewards"]
        except (ValueError, KeyError, TypeError):
            raise PhaseError(f'{FIELD}: {cfg.uri} answered {reply.text[:200]!r}; it must answer JSON '
                             '{"rewards": [one number per response]}') from None

    return post
