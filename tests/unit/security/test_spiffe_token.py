"""SPIFFE IDs and workload tokens: accepted and rejected inputs."""

from __future__ import annotations

import base64
import json

import pytest

from pymesh.errors import ConfigError
from pymesh.security import SpiffeId, TokenError, generate_key, issue_token, verify_token


def test_spiffe_roundtrip() -> None:
    sid = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/bookinfo-reviews")
    assert (sid.trust_domain, sid.namespace, sid.service_account) == (
        "cluster.local",
        "default",
        "bookinfo-reviews",
    )
    assert str(sid) == "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    assert sid.k8s_subject == "system:serviceaccount:default:bookinfo-reviews"
    assert SpiffeId.from_k8s_subject("td", sid.k8s_subject) == SpiffeId(
        "td", "default", "bookinfo-reviews"
    )


@pytest.mark.parametrize(
    "uri",
    [
        "http://cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a/sa",
        "spiffe://cluster.local/ns/a/sa/b/extra",
        "spiffe://cluster.local/sa/a/ns/b",
        "spiffe://Cluster.Local/ns/a/sa/b",
        "spiffe:///ns/a/sa/b",
        "spiffe://td/ns/UPPER/sa/b",
        "spiffe://td/ns/a/sa/",
        "spiffe://td/ns/-a/sa/b",
    ],
)
def test_spiffe_rejects(uri: str) -> None:
    with pytest.raises(ConfigError):
        SpiffeId.parse(uri)


KEY = generate_key()
ISS = "pymesh-ca"


def _token(**kw: object) -> str:
    args: dict[str, object] = {
        "namespace": "default",
        "service_account": "reviews",
        "issuer": ISS,
        "now": 1000.0,
        "ttl": 600.0,
    }
    args.update(kw)
    return issue_token(KEY, **args)  # type: ignore[arg-type]


def test_token_roundtrip() -> None:
    ident = verify_token(_token(), (KEY.public_key(),), issuer=ISS, now=1100.0)
    assert (ident.namespace, ident.service_account, ident.expires) == ("default", "reviews", 1600.0)
    claims = json.loads(base64.urlsafe_b64decode(_token().split(".")[1] + "=="))
    assert claims["sub"] == "system:serviceaccount:default:reviews"
    assert claims["kubernetes.io"] == {
        "namespace": "default",
        "serviceaccount": {"name": "reviews"},
    }


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _tamper(token: str, **claims: object) -> str:
    h, p, s = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(p + "=="))
    body.update(claims)
    return f"{h}.{_b64(body)}.{s}"


@pytest.mark.parametrize(
    ("token", "now", "why"),
    [
        (_token(), 1700.0, "expired"),
        (_token(now=5000.0), 1000.0, "not yet valid"),
        (
            issue_token(
                generate_key(),
                namespace="default",
                service_account="reviews",
                issuer=ISS,
                now=1000.0,
                ttl=600.0,
            ),
            1100.0,
            "signature",
        ),  # type: ignore[arg-type]
        (_tamper(_token(), sub="system:serviceaccount:kube-system:admin"), 1100.0, "signature"),
        (_token(issuer="someone-else"), 1100.0, "issuer"),
        (_token(audience="other"), 1100.0, "audience"),
        (_b64({"alg": "none"}) + "." + _b64({"sub": "x"}) + ".", 1100.0, "ES256"),
        (_b64({"alg": "HS256"}) + "." + _b64({"sub": "x"}) + ".abc", 1100.0, "ES256"),
        ("not-a-jwt", 1100.0, "malformed"),
        ("a.b.c", 1100.0, "malformed"),
    ],
)
def test_token_rejects(token: str, now: float, why: str) -> None:
    with pytest.raises(TokenError, match=why):
        verify_token(token, (KEY.public_key(),), issuer=ISS, now=now)
