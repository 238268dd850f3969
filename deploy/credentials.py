"""TLS and node-authentication material for a Flower deployment, made with `cryptography` (ships with flwr).

* ``make_tls(out_dir, hosts)`` writes ``ca.crt``/``ca.key`` (the federation's own CA) and ``server.pem``/``server.key``
  (the SuperLink's certificate, signed by the CA, valid for every name in ``hosts``). The CA certificate is the only
  file an institution receives; the keys stay with the operator.
* ``make_node_key(out_dir, name)`` writes ``<name>`` (private, OpenSSH, EC SECP384R1: the curve Flower accepts) and
  ``<name>.pub``. The institution keeps the private key; it sends the operator the ``.pub`` to register.

Every file is written atomically (fedrag_app.core.atomic); private keys are mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrag_app.core.atomic import write_bytes

VALID_DAYS = 365


def make_tls(out_dir: str | Path, hosts: list[str]) -> dict[str, Path]:
    """A CA and a SuperLink certificate for ``hosts`` (DNS names or IPs). Refuses to overwrite an existing CA."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("ca.crt", "ca.key", "server.pem", "server.key")}
    if paths["ca.key"].exists():
        raise FileExistsError(
            f"{paths['ca.key']} exists: a new CA would orphan every issued certificate; use another folder"
        )
    if not hosts:
        raise ValueError("give at least one host name or IP the SuperNodes will dial (e.g. 127.0.0.1)")

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrag federation CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    server_cert = (
        _builder(server_name, ca_name, server_key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    write_bytes(paths["ca.key"], _pem_key(ca_key), private=True)
    write_bytes(paths["ca.crt"], ca_cert.public_bytes(serialization.Encoding.PEM))
    write_bytes(paths["server.key"], _pem_key(server_key), private=True)
    write_bytes(paths["server.pem"], server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def make_node_key(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """An EC SECP384R1 key pair in OpenSSH format: (private, public). Refuses to overwrite."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / name, out / f"{name}.pub"
    if private_path.exists():
        raise FileExistsError(f"{private_path} exists: keep it, or delete it and unregister its public key first")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_bytes(private_path, private, private=True)
    write_bytes(public_path, public + f" {name}\n".encode())
    return private_path, public_path


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_encipherment=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        content_commitment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
