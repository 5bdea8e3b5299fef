"""Mutual TLS for cluster links (CLUSTER §8.7, reference §9.3/§9.7).

One certificate and key serve both roles: a node presents it when it accepts a link and
when it dials one. Both sides require the other's certificate and verify it against the
cluster CA, so only holders of a CA-signed certificate can join.

Name checking (the choice for ``ip:port`` peers): a dialer checks that the acceptor's
certificate names the host it dialed, as the original does (rustls verifies the server
name it was given; an IP literal is matched against the certificate's IP SANs). Cluster
addresses are socket addresses, so each node's certificate needs an IP SAN (or a DNS SAN
for configured host names) for the address its peers dial. Acceptors never check names:
dialers connect from arbitrary ports and addresses, and the CA signature is what
authorises them. ``check_hostname=False`` turns the dialer's name check off for
clusters whose certificates carry no per-node names (any CA-signed peer is then
trusted, which is weaker: a member could impersonate another member's address).

TLS 1.3 is preferred (OpenSSL negotiates the highest version both support); 1.2 is the
minimum. SNI is sent for host names only (TLS forbids IP literals in SNI).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["ENV_CA", "ENV_CERT", "ENV_KEY", "ClusterTLS"]

ENV_CERT = "WSE_CLUSTER_TLS_CERT"
ENV_KEY = "WSE_CLUSTER_TLS_KEY"
ENV_CA = "WSE_CLUSTER_TLS_CA"


def _base_context(protocol: int, cert_path: str, key_path: str, ca_path: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    ctx.load_verify_locations(cafile=ca_path)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass(frozen=True)
class ClusterTLS:
    """Paths of the node's certificate (PEM, chain allowed), its key and the cluster CA.

    The contexts are built at construction, so a missing file, a key that does not match
    the certificate or an unreadable CA raises here (``OSError`` / ``ssl.SSLError``),
    not at the first handshake.
    """

    cert_path: str
    key_path: str
    ca_path: str
    check_hostname: bool = True
    server_context: ssl.SSLContext = field(init=False, repr=False, compare=False)
    client_context: ssl.SSLContext = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("cert_path", "key_path", "ca_path"):
            value = getattr(self, name)
            if not isinstance(value, str | os.PathLike) or not os.fspath(value):
                raise ValueError(f"{name} must be a non-empty path, got {value!r}")
        cert, key, ca = (os.fspath(p) for p in (self.cert_path, self.key_path, self.ca_path))
        server = _base_context(ssl.PROTOCOL_TLS_SERVER, cert, key, ca)
        client = _base_context(ssl.PROTOCOL_TLS_CLIENT, cert, key, ca)
        client.check_hostname = self.check_hostname
        object.__setattr__(self, "server_context", server)
        object.__setattr__(self, "client_context", client)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, check_hostname: bool = True
    ) -> ClusterTLS | None:
        """Read ``WSE_CLUSTER_TLS_CERT``/``_KEY``/``_CA``: all three set gives a
        ``ClusterTLS``, none gives None, anything in between is a ``ValueError``
        (the original's rule: all or none). Empty values count as unset."""
        env = os.environ if environ is None else environ
        values = {name: env.get(name) or None for name in (ENV_CERT, ENV_KEY, ENV_CA)}
        given = [name for name, value in values.items() if value is not None]
        if not given:
            return None
        if len(given) != 3:
            missing = ", ".join(name for name in values if name not in given)
            raise ValueError(f"cluster TLS needs all of cert, key and CA; missing {missing}")
        cert, key, ca = (values[n] for n in (ENV_CERT, ENV_KEY, ENV_CA))
        assert cert is not None and key is not None and ca is not None
        return cls(cert, key, ca, check_hostname=check_hostname)

    @staticmethod
    def server_hostname(host: str) -> str:
        """The name a dialer checks (and sends as SNI when it is not an IP literal):
        the host part of the configured ``host:port``, without IPv6 brackets."""
        if host.startswith("[") and host.endswith("]"):
            return host[1:-1]
        return host
