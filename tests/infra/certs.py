"""Throw-away PKI for the test control plane, made with the ``openssl`` command line tool."""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {cn}
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {sans}
"""


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path  # service-account signing key (private)
    sa_pub: Path  # and its public half, for token verification
    admin_token: str
    token_file: Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def make_pki(directory: Path, admin_user: str = "rlp-test-admin") -> Pki:
    """A CA, a serving cert for 127.0.0.1/localhost/kubernetes.default, an SA key pair, a token file."""
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    sans = ",".join(
        [
            "IP:127.0.0.1",
            "IP:10.0.0.1",  # first address of --service-cluster-ip-range: the kubernetes Service
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ]
    )
    (d / "ca.cnf").write_text(_OPENSSL_CNF.format(cn="rlp-test-ca", sans=sans))
    (d / "server.cnf").write_text(_OPENSSL_CNF.format(cn="kube-apiserver", sans=sans))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
             "-config", "ca.cnf", "-extensions", "v3_ca", cwd=d)
    _openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-config", "server.cnf", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "3650", "-extfile", "server.cnf", "-extensions", "v3_server", cwd=d)
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "sa.key", cwd=d)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    token = secrets.token_hex(24)
    token_file = d / "tokens.csv"
    # token,user,uid,"group1,group2" — system:masters bypasses RBAC: the tests' admin.
    token_file.write_text(f'{token},{admin_user},{admin_user},"system:masters"\n')
    for key in ("ca.key", "server.key", "sa.key", "tokens.csv"):
        (d / key).chmod(0o600)
    return Pki(
        ca_cert=d / "ca.crt",
        ca_key=d / "ca.key",
        serving_cert=d / "server.crt",
        serving_key=d / "server.key",
        sa_key=d / "sa.key",
        sa_pub=d / "sa.pub",
        admin_token=token,
        token_file=token_file,
    )
