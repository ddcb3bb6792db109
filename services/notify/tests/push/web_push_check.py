"""Checks one Web Push request with independent implementations.

Reads JSON on stdin: the request body (base64url), the subscription's
private key (PKCS#8 PEM) and auth secret (base64url), the Authorization
header and the endpoint's origin. Decrypts the body with http_ece
(RFC 8291 aes128gcm), verifies the VAPID JWT's ES256 signature with the
key in `k` and its audience, and prints the plaintext. Exits non-zero with
the reason on any failure.
"""

import base64
import json
import sys
import time

import http_ece
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature


def b64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def main():
    request = json.load(sys.stdin)
    private_key = serialization.load_pem_private_key(request["private_pem"].encode(), password=None)
    plaintext = http_ece.decrypt(
        b64url(request["body"]),
        private_key=private_key,
        auth_secret=b64url(request["auth"]),
        version="aes128gcm",
    )

    scheme, _, params = request["authorization"].partition(" ")
    assert scheme == "vapid", scheme
    fields = dict(part.strip().split("=", 1) for part in params.split(","))
    header, claims, signature = fields["t"].split(".")
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url(fields["k"]))
    raw = b64url(signature)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
    assert json.loads(b64url(header))["alg"] == "ES256"
    claims = json.loads(b64url(claims))
    assert claims["aud"] == request["audience"], claims
    assert time.time() < claims["exp"] <= time.time() + 24 * 3600, claims

    sys.stdout.write(plaintext.decode())


if __name__ == "__main__":
    main()
