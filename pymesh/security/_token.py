"""Service-account tokens: JWTs (ES256) shaped like Kubernetes projected SA tokens.

The embedded CA signs them with its own P-256 key and accepts only its own. Claims::

    {"iss": ISSUER, "sub": "system:serviceaccount:NS:SA", "aud": [AUDIENCE],
     "iat": .., "nbf": .., "exp": ..,
     "kubernetes.io": {"namespace": NS, "serviceaccount": {"name": SA}}}

Only ES256 is accepted (no ``alg: none``, no algorithm switching).
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from pymesh.errors import PymeshError

__all__ = [
    "DEFAULT_AUDIENCE",
    "TokenError",
    "TokenIdentity",
    "issue_token",
    "token_id_of",
    "verify_token",
]

DEFAULT_AUDIENCE = "istio-ca"
_MAX_TOKEN = 16 * 1024
_LEEWAY = 30.0


class TokenError(PymeshError):
    """A token is malformed, forged, expired or not for us."""


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """Who a verified token says the caller is."""

    namespace: str
    service_account: str
    expires: float
    token_id: str | None = None
    """The token's ``jti`` (what a revocation names); ``None`` for tokens without one."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(
    key: ec.EllipticCurvePrivateKey,
    *,
    namespace: str,
    service_account: str,
    issuer: str,
    now: float,
    ttl: float,
    audience: str = DEFAULT_AUDIENCE,
    token_id: str | None = None,
) -> str:
    """A signed ES256 token for ``NS/SA`` valid from ``now`` for ``ttl`` seconds, with a
    random ``jti`` (``token_id``) that a revocation list can name."""
    header = {"alg": "ES256", "typ": "JWT"}
    claims = {
        "iss": issuer,
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
        "aud": [audience],
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now + ttl),
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": service_account}},
        "jti": token_id or secrets.token_hex(16),
    }
    signing_input = (
        _b64(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64(json.dumps(claims, separators=(",", ":")).encode())
    )
    der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return signing_input + "." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def verify_token(
    token: str,
    keys: tuple[ec.EllipticCurvePublicKey, ...],
    *,
    issuer: str,
    now: float,
    audience: str = DEFAULT_AUDIENCE,
) -> TokenIdentity:
    """Check signature (any of ``keys``), issuer, audience and time; return the identity."""
    if len(token) > _MAX_TOKEN:
        raise TokenError("token too large")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("malformed token (not a JWS compact serialization)")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
        sig = _unb64(parts[2])
    except (ValueError, UnicodeDecodeError) as exc:
        raise TokenError(f"malformed token: {exc}") from exc
    if not isinstance(header, dict) or header.get("alg") != "ES256":
        raise TokenError("token algorithm must be ES256")
    if len(sig) != 64:
        raise TokenError("bad token signature length")
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    signing_input = (parts[0] + "." + parts[1]).encode("ascii")
    for public in keys:
        try:
            public.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
            break
        except InvalidSignature:
            continue
    else:
        raise TokenError("token signature does not verify (forged or foreign token)")
    if not isinstance(claims, dict):
        raise TokenError("token claims are not an object")
    return _check_claims(claims, issuer=issuer, audience=audience, now=now)


def _check_claims(
    claims: dict[str, Any], *, issuer: str, audience: str, now: float
) -> TokenIdentity:
    if claims.get("iss") != issuer:
        raise TokenError(f"token issuer {claims.get('iss')!r} is not {issuer!r}")
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud
    if not isinstance(auds, list) or audience not in auds:
        raise TokenError(f"token audience {aud!r} does not include {audience!r}")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or now > exp + _LEEWAY:
        raise TokenError("token expired")
    nbf = claims.get("nbf", 0)
    if not isinstance(nbf, int | float) or now + _LEEWAY < nbf:
        raise TokenError("token not yet valid")
    sub = claims.get("sub")
    parts = sub.split(":") if isinstance(sub, str) else []
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
        raise TokenError(f"token subject {sub!r} is not a service account")
    k8s = claims.get("kubernetes.io")
    if isinstance(k8s, dict):
        sa = k8s.get("serviceaccount")
        if (
            k8s.get("namespace") != parts[2]
            or not isinstance(sa, dict)
            or sa.get("name") != parts[3]
        ):
            raise TokenError("token kubernetes.io claims disagree with its subject")
    jti = claims.get("jti")
    return TokenIdentity(parts[2], parts[3], float(exp), jti if isinstance(jti, str) else None)


def token_id_of(token: str) -> str | None:
    """The ``jti`` of ``token`` without verifying it (to name it in a revocation)."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise TokenError("malformed token (not a JWS compact serialization)")
    try:
        claims = json.loads(_unb64(parts[1]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TokenError(f"malformed token: {exc}") from exc
    jti = claims.get("jti") if isinstance(claims, dict) else None
    return jti if isinstance(jti, str) else None
