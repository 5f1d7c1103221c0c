"""Model URIs: hf://org/name@revision fetched by huggingface_hub's snapshot_download from a local stand-in
for the Hub (an HTTP server speaking the Hub's API for one repository), the resolved commit recorded in
the phase manifest's metrics, and the errors that name the field: no network, unknown repository,
not a model directory, unknown architecture, tokenizer missing."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlp_core.context import PhaseContext, PhaseError
from rlp_core.models import build_tiny_policy, save_model, train_tokenizer
from rlp_core.spec import RLPRun, TinyModel

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _handler(repo: str, files: dict[str, bytes]):
    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _not_found(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _file(self, body: bool):
            prefix = f"/{repo}/resolve/"
            rev, _, name = self.path.removeprefix(prefix).partition("/")
            if not self.path.startswith(prefix) or rev not in ("main", COMMIT) or name not in files:
                return self._not_found()
            data = files[name]
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self):
            self._file(body=False)

        def do_GET(self):
            if self.path.startswith("/api/models/"):
                route = self.path.removeprefix("/api/models/").split("?")[0]
                kind = "tree" if "/tree/" in route else "revision"
                name, _, rev = route.partition(f"/{kind}/")
                if name != repo or rev not in ("main", COMMIT):
                    return self._not_found()
                if kind == "tree":
                    listing = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                               for f, d in files.items()]
                else:
                    listing = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
                doc = json.dumps(listing).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(doc)))
                self.end_headers()
                self.wfile.write(doc)
                return
            self._file(body=True)

    return Hub


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tok = train_tokenizer([f"{a}+{b}={a + b}" for a in range(10) for b in range(10)], 48)
    model = build_tiny_policy(tok, TinyModel(hidden_size=16, num_heads=2, intermediate_size=32, max_positions=32), 0)
    out = tmp_path_factory.mktemp("tiny")
    save_model(model, tok, out)
    return out


@pytest.fixture(scope="module")
def hub(model_dir):
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler("rlp-test/tiny", files))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def context(tmp_path: Path, spec: dict) -> PhaseContext:
    run = RLPRun.model_validate({"spec": spec})
    return PhaseContext(run, 1, "optimize", None, tmp_path / "cache", tmp_path / "out", None)


def test_hf_uri_is_fetched_with_snapshot_download_and_its_commit_recorded(tmp_path, hub, model_dir):
    uri = "hf://rlp-test/tiny@main"
    ctx = context(tmp_path, {"policy": {"model": uri}, "hub": {"endpoint": hub}})
    local = ctx.start_policy_dir()
    assert ctx.model_revisions == {uri: COMMIT}
    assert local.name == COMMIT and (local / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    fetched, original = AutoModelForCausalLM.from_pretrained(local), AutoModelForCausalLM.from_pretrained(model_dir)
    for a, b in zip(fetched.parameters(), original.parameters(), strict=True):
        assert torch.equal(a, b)


def test_unknown_repository_names_the_field(tmp_path, hub):
    ctx = context(tmp_path, {"rewardModel": {"model": "hf://rlp-test/missing@main"}, "hub": {"endpoint": hub},
                         "rewardLearning": {"strategy": "none"}})
    with pytest.raises(PhaseError, match=r"spec\.rewardModel\.model: hf://rlp-test/missing@main: no such repository"):
        ctx.reward_model_dir()


def test_no_network_for_hf_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: the Hub is unreachable
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    ctx = context(tmp_path, {"policy": {"model": "hf://org/model@v1"}, "hub": {"endpoint": closed}})
    with pytest.raises(PhaseError, match=r"spec\.policy\.model: hf://org/model@v1: the Hugging Face Hub is not reachable"):
        ctx.start_policy_dir()


def test_bad_model_directories_name_the_field_and_the_fix(tmp_path, model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((model_dir / "config.json").read_text())
    cases = {empty: "not a model directory", alien: "unknown architecture 'no-such-arch'", no_tok: "tokenizer missing"}
    for path, message in cases.items():
        with pytest.raises(PhaseError, match=rf"spec\.policy\.model: file://{path}: {message}"):
            context(tmp_path, {"policy": {"model": f"file://{path}"}}).start_policy_dir()
