"""Throwaway PKIs for TLS tests, made with cryptography (no network, no openssl CLI).

    pki = tlsgen.make_pki(tmp_path / "pki")
    pki["ca.crt"], pki["server.crt"], pki["server.key"], pki["client.crt"], ...

Files (PEM; keys 0600):

- ca.crt                      the test CA everyone trusts
- server.crt/.key             for 127.0.0.1 and localhost (SAN), serverAuth
- client.crt/.key             CN "mfconsole", clientAuth (and serverAuth, so a peer
                              that checks purposes loosely still takes it)
- modality.crt/.key           CN "ct1.modality.test" + SAN DNS, clientAuth
- modality-other.crt/.key     CN "ct1.modality.test" but SAN DNS "Other.Example" only,
                              clientAuth (the SAN, not the CN, is its identity)
- named-server.crt/.key       only the name "pacs.test" (for server_name)
- expired-server.crt/.key     validity ended yesterday
- expired-client.crt/.key
- rogue-ca.crt                another CA nobody trusts
- rogue-server.crt/.key       127.0.0.1, signed by the rogue CA
- rogue-client.crt/.key       CN "mfconsole", signed by the rogue CA

RSA 2048 throughout: DCMTK's BCP 195 profiles negotiate ECDHE_RSA suites for TLS 1.2.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

_KEYS: list[Any] = []   # RSA keys take ~0.1 s each: one set per process serves every PKI
NAMES = ("ca.crt", "rogue-ca.crt") + tuple(
    f"{stem}.{ext}" for stem in ("server", "client", "modality", "named-server", "expired-server",
                                 "expired-client", "rogue-server", "rogue-client",
                                 "modality-other")
    for ext in ("crt", "key"))


def make_pki(folder: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)

    made = iter(range(len(NAMES)))

    def key() -> Any:
        i = next(made)
        while len(_KEYS) <= i:
            _KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        return _KEYS[i]

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, subject_key: Any, issuer: tuple[str, Any] | None, *,
              san: list[Any] = (), usage: list[Any] = (), expired: bool = False) -> Any:
        issuer_name, signer = issuer if issuer else (subject, subject_key)
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer_name))
             .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - (3 * day if expired else datetime.timedelta(minutes=5)))
             .not_valid_after(now - day if expired else now + 2 * day)
             .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
        if issuer is None:
            b = b.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()),
                                critical=False)
        else:
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signer.public_key()), critical=False)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
        return b.sign(signer, hashes.SHA256())

    def write(stem: str, certificate: Any, private: Any = None) -> None:
        (folder / f"{stem}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        if private is not None:
            path = folder / f"{stem}.key"
            path.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.TraditionalOpenSSL,
                                                   serialization.NoEncryption()))
            path.chmod(0o600)

    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    server_use = [ExtendedKeyUsageOID.SERVER_AUTH]
    client_use = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    for ca_stem, ca_cn, prefix in (("ca", "mfconsole test CA", ""), ("rogue-ca", "rogue CA", "rogue-")):
        ca_key = key()
        write(ca_stem, issue(ca_cn, ca_key, None))
        ca = (ca_cn, ca_key)
        leaves = [("server", "127.0.0.1", loopback, server_use, False),
                  ("client", "mfconsole", [], client_use, False)]
        if not prefix:
            leaves += [("modality", "ct1.modality.test", [x509.DNSName("ct1.modality.test")],
                        client_use, False),
                       ("named-server", "pacs.test", [x509.DNSName("pacs.test")], server_use, False),
                       ("expired-server", "127.0.0.1", loopback, server_use, True),
                       ("expired-client", "mfconsole", [], client_use, True),
                       ("modality-other", "ct1.modality.test", [x509.DNSName("Other.Example")],
                        client_use, False)]
        for stem, cn, san, usage, expired in leaves:
            k = key()
            write(prefix + stem, issue(cn, k, ca, san=san, usage=usage, expired=expired), k)
    return {n: folder / n for n in NAMES}


def server_context(pki: dict[str, Path], stem: str = "server", *, require_client_cert: bool = False):
    """A plain Python server context for test peers (not mfconsole's policy)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki[f"{stem}.crt"], pki[f"{stem}.key"])
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["ca.crt"])
    return ctx
