"""TLS credentials as QEMU's ``tls-creds-x509`` object describes them.

``--object tls-creds-x509,id=ID,endpoint=server,dir=DIR[,verify-peer=on|off]``: the directory
holds ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem`` (the client side:
``client-cert.pem`` and ``client-key.pem``). As in QEMU, ``verify-peer`` is on by default:
a client must present a certificate signed by the CA. The standard ``ssl`` module does the
rest (TLS 1.2 or later).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from dirtybits.errors import UsageError


@dataclass(frozen=True)
class X509Creds:
    id: str
    endpoint: str
    dir: str
    verify_peer: bool = True

    def context(self) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` for this endpoint. Raises ``UsageError`` for missing or
        unreadable files (QEMU's words where it has them)."""
        if self.endpoint == "server":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            cert, key = "server-cert.pem", "server-key.pem"
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            cert, key = "client-cert.pem", "client-key.pem"
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ca = os.path.join(self.dir, "ca-cert.pem")
        try:
            ctx.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"Unable to access credentials {ca}: {exc}") from exc
        certfile, keyfile = os.path.join(self.dir, cert), os.path.join(self.dir, key)
        if self.endpoint == "server" or os.path.exists(certfile):
            try:
                ctx.load_cert_chain(certfile, keyfile)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"Unable to load certificate {certfile} or key {keyfile}: "
                                 f"{exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        return ctx


def parse_object(props: dict[str, str]) -> X509Creds:
    """A ``tls-creds-x509`` object from its properties (``qom-type`` already checked).
    Raises ``UsageError``."""
    known = {"qom-type", "id", "endpoint", "dir", "verify-peer"}
    extra = sorted(set(props) - known)
    if extra:
        raise UsageError(f"Property 'tls-creds-x509.{extra[0]}' not found")
    oid = props.get("id")
    if not oid:
        raise UsageError("Parameter 'id' is missing")
    endpoint = props.get("endpoint", "client")
    if endpoint not in ("client", "server"):
        raise UsageError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    directory = props.get("dir")
    if not directory:
        raise UsageError("Parameter 'dir' is missing")
    verify = props.get("verify-peer", "on")
    if verify not in ("on", "off", "yes", "no", "true", "false"):
        raise UsageError("Parameter 'verify-peer' expects 'on' or 'off'")
    return X509Creds(oid, endpoint, directory, verify in ("on", "yes", "true"))


__all__ = ["X509Creds", "parse_object"]
