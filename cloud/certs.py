"""TLS and SuperNode-authentication material for a Flower deployment, made with ``cryptography``.

What :func:`write_deployment_certs` writes under ``out``::

    ca.crt                  the root certificate: every SuperNode and every ``flwr`` CLI gets a copy
    ca.key          (0600)  signs the server certificate; keep it offline, never on a SuperNode
    server.crt              the SuperLink's certificate, SAN = 127.0.0.1, localhost + the hosts given
    server.key      (0600)  the SuperLink's TLS key
    nodes/node-I.pub        SuperNode I's public key (OpenSSH ``ecdsa-sha2-nistp384``): the operator
                            registers it with ``flwr supernode register nodes/node-I.pub``
    nodes/node-I    (0600)  SuperNode I's private key (OpenSSH): goes to data owner I only, for
                            ``flower-supernode --auth-supernode-private-key``

Every key is EC P-384 (``--enable-supernode-auth`` accepts NIST curves; P-384 is what Flower's
docs use). A data owner may also make its own key pair with :func:`write_node_key` and send
only the ``.pub`` to the operator, so that no private key ever travels.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CURVE = ec.SECP384R1


class CertError(ValueError):
    """Refused to write TLS material (existing files, bad host name); the message names it."""


@dataclass(frozen=True)
class DeploymentCerts:
    """Paths of the files :func:`write_deployment_certs` wrote."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys; the public key of each is ``path + '.pub'``

    @property
    def node_public_keys(self) -> tuple[Path, ...]:
        return tuple(public_key_path(key) for key in self.node_keys)


def public_key_path(private_key: Path) -> Path:
    return private_key.with_name(private_key.name + ".pub")


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def _write_private(path: Path, data: bytes) -> Path:
    """Create ``path`` with mode 0600 from the start (no window where it is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode is masked by umask and ignored for an existing file
    return path


def _write_public(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def subject_alt_names(hosts) -> list[x509.GeneralName]:
    """IP addresses as ``IPAddress`` entries, anything else as ``DNSName``; duplicates dropped."""
    names: list[x509.GeneralName] = []
    seen = set()
    for host in [*DEFAULT_HOSTS, *hosts]:
        host = str(host).strip()
        if not host or host in seen:
            continue
        seen.add(host)
        if any(c.isspace() for c in host) or ":" in host and not _is_ip(host) or "/" in host:
            raise CertError(f"host {host!r}: not a host name or IP address (give NAME or IP, without port)")
        names.append(x509.IPAddress(ipaddress.ip_address(host)) if _is_ip(host) else x509.DNSName(host))
    return names


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def make_ca(
    common_name: str = "Offsite federation CA", days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts=(), days: int = 825
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A SuperLink certificate signed by the CA, valid for 127.0.0.1, localhost and ``hosts``."""
    key = _new_key()
    names = subject_alt_names(hosts)
    common_name = next((str(n.value) for n in reversed(names) if isinstance(n, x509.DNSName)), "localhost")
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def write_node_key(path: Path, comment: str = "") -> Path:
    """One SuperNode authentication key pair: ``path`` (OpenSSH private, 0600) and ``path.pub``."""
    path = Path(path)
    key = _new_key()
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(public_key_path(path), public + (f" {comment}".encode() if comment else b"") + b"\n")
    return path


def write_deployment_certs(
    out: Path, nodes: int = 3, hosts=(), force: bool = False, days: int = 825
) -> DeploymentCerts:
    """A CA, a SuperLink certificate and ``nodes`` SuperNode key pairs under ``out`` (layout above).

    Refuses to overwrite an existing ``ca.key`` unless ``force``: a new CA would silently
    invalidate every root certificate already handed out.
    """
    if nodes < 0:
        raise CertError(f"nodes must be >= 0, got {nodes}")
    out = Path(out)
    paths = DeploymentCerts(
        root=out,
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.crt",
        server_key=out / "server.key",
        node_keys=tuple(out / "nodes" / f"node-{index}" for index in range(nodes)),
    )
    existing = [p for p in (paths.ca_key, paths.server_key, *paths.node_keys) if p.exists()]
    if existing and not force:
        raise CertError(
            f"{existing[0]}: already exists (pass force=True / --force to replace all TLS material in {out})"
        )
    subject_alt_names(hosts)  # reject a bad host before writing anything
    ca_key, ca_cert = make_ca(days=max(days, 3650))
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, days=days)
    _write_private(paths.ca_key, _pem_key(ca_key))
    _write_public(paths.ca_cert, _pem_cert(ca_cert))
    _write_private(paths.server_key, _pem_key(server_key))
    _write_public(paths.server_cert, _pem_cert(server_cert))
    for index, key_path in enumerate(paths.node_keys):
        write_node_key(key_path, comment=f"offsite-node-{index}")
    return paths
