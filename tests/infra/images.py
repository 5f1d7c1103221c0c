"""The project's two container images for tests, built from the committed Dockerfiles by
scripts/build-images.sh and run with podman (daemonless).

The script keeps an image whose inputs (Dockerfile, build context, base images) are unchanged, so calling
it again is cheap; a source change rebuilds only the layers after the dependencies. Its containers.conf
(runc, file-descriptor limits) is used for every podman call made here.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-images.sh"
IMAGE_UID = 10001  # the user of both Dockerfiles


def _cache_dir() -> Path:
    return Path(os.environ.get("RLP_IMAGE_CACHE_DIR") or Path.home() / ".cache" / "rlp-images")


@dataclass(frozen=True)
class Podman:
    """podman with the build script's containers.conf."""

    executable: str = "podman"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(_cache_dir() / "containers.conf")}

    def argv(self, *args: str) -> list[str]:
        return [self.executable, *args]

    def run(self, *args: str, timeout: float = 600, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=check)  # fmt: skip


@dataclass(frozen=True)
class ContainerImages:
    operator: str
    job: str
    podman: Podman

    def size(self, image: str) -> int:
        """Bytes of the image (all its layers, the base's included)."""
        return int(self.podman.run("image", "inspect", "--format", "{{.Size}}", image, check=True).stdout)

    def label(self, image: str, key: str) -> str:
        fmt = f'{{{{index .Config.Labels "{key}"}}}}'
        return self.podman.run("image", "inspect", "--format", fmt, image, check=True).stdout.strip()


class ImageBuildError(RuntimeError):
    pass


def build_images() -> ContainerImages:
    """Run scripts/build-images.sh with podman (a no-op for images that are up to date); its log goes to
    ``RLP_IMAGE_CACHE_DIR/last-build.log``."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY", "TAG")}
    env["RLP_IMAGE_BUILDER"] = "podman"
    log_path = _cache_dir() / "last-build.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        rc = subprocess.run([str(BUILD_SCRIPT)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise ImageBuildError(f"scripts/build-images.sh failed ({rc}); {log_path} ends with:\n{tail}")
    return ContainerImages(operator=f"localhost/rlp-operator:{version}", job=f"localhost/rlp-job:{version}",
                           podman=Podman())  # fmt: skip
