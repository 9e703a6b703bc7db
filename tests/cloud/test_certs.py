"""TLS material: the server certificate chains to the CA and names the right hosts, node keys are
EC P-384 in the OpenSSH formats Flower reads, private keys are 0600, nothing is overwritten."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from offsite.cli import main
from offsite.cloud.certs import CertError, write_deployment_certs, write_node_key


def test_material_chains_names_hosts_and_is_private(tmp_path):
    made = write_deployment_certs(tmp_path / "tls", nodes=3, hosts=["superlink.example.org", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    assert set(names.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    }
    server_key = load_pem_private_key(made.server_key.read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()

    assert len(made.node_keys) == 3
    publics = set()
    for private_path, public_path in zip(made.node_keys, made.node_public_keys):
        private = load_ssh_private_key(private_path.read_bytes(), None)
        public = load_ssh_public_key(public_path.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert public.public_numbers() == private.public_key().public_numbers()
        assert public_path.read_text().startswith("ecdsa-sha2-nistp384 ")
        publics.add(public_path.read_text().split()[1])
    assert len(publics) == 3  # distinct keys

    for private_path in (made.ca_key, made.server_key, *made.node_keys):
        assert stat.S_IMODE(private_path.stat().st_mode) == 0o600, private_path
    for public_path in (made.ca_cert, made.server_cert, *made.node_public_keys):
        assert stat.S_IMODE(public_path.stat().st_mode) == 0o644, public_path


def test_existing_material_is_not_overwritten(tmp_path):
    first = write_deployment_certs(tmp_path, nodes=1)
    before = first.ca_cert.read_bytes()
    with pytest.raises(CertError, match="ca.key"):
        write_deployment_certs(tmp_path, nodes=1)
    assert first.ca_cert.read_bytes() == before
    again = write_deployment_certs(tmp_path, nodes=1, force=True)
    assert again.ca_cert.read_bytes() != before


@pytest.mark.parametrize("host", ["has space", "host:9093", "a/b"])
def test_a_bad_host_is_refused_before_anything_is_written(tmp_path, host):
    with pytest.raises(CertError, match="host"):
        write_deployment_certs(tmp_path / "tls", nodes=1, hosts=[host])
    assert not (tmp_path / "tls").exists()


def test_node_key_alone_is_private(tmp_path):
    key = write_node_key(tmp_path / "me" / "node-key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert load_ssh_public_key((tmp_path / "me" / "node-key.pub").read_bytes()).curve.name == "secp384r1"


def test_deploy_certs_command(tmp_path, capsys):
    out = tmp_path / "tls"
    assert main(["deploy", "certs", "--out", str(out), "--nodes", "2", "--host", "link.example.org"]) == 0
    assert sorted(p.name for p in (out / "nodes").iterdir()) == ["node-0", "node-0.pub", "node-1", "node-1.pub"]
    assert main(["deploy", "certs", "--out", str(out)]) == 2  # refuses to replace the CA
    assert "already exists" in capsys.readouterr().err
    assert main(["deploy", "certs", "--out", str(out), "--skip-existing"]) == 0
