"""Keys and detached signatures: can a server tell its site's own images from anyone else's?

An ed25519 key pair (`envmgr key generate`) signs a statement; the statement is the bytes that
name every other thing by hash: an export's `envmgr/export.json` (every member's sha256, the image
ID, the tag and the inputs), or for a registry push a small JSON naming the image ID, tag and
inputs hash. A signature document carries the signer's public key, so a refusal can say which key
signed even when that key is not trusted here. Trust is the site config's `[trust]` section:
`keys` (public key files) and `require_signature`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from envmgr.core.config import TrustConfig
from envmgr.core.errors import UsageError

SIGNATURE_FORMAT = "envmgr-signature/1"
MAX_SIGNATURE_BYTES = 64 << 10   # a signature document is a few hundred bytes; refuse anything large


def key_id(public: Ed25519PublicKey) -> str:
    """`ed25519:` + the first 16 hex digits of the raw public key's sha256 (what messages name)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def generate_key(path: Path) -> dict:
    """Write a new private key to `path` (mode 0600, PEM PKCS8) and its public key to `path`.pub."""
    path = path.expanduser()
    public_path = path.with_name(path.name + ".pub")
    for existing in (path, public_path):
        if existing.exists():
            raise UsageError(f"{existing} already exists: refusing to overwrite a key",
                             hint="choose another path or remove the old key first")
    path.parent.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # O_EXCL + mode 0600 at creation: the private key is never readable by others, not even briefly
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public = private.public_key()
    public_path.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return {"private_key": str(path), "public_key": str(public_path), "key_id": key_id(public)}


def load_private_key(path: Path) -> Ed25519PrivateKey:
    path = path.expanduser()
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise UsageError(f"signing key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"signing key {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"signing key {path}: not an ed25519 key (`envmgr key generate` makes one)")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    path = Path(path).expanduser()
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"[trust] keys: {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"[trust] keys: {path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"[trust] keys: {path}: not an ed25519 public key")
    return key


def sign(statement: bytes, private: Ed25519PrivateKey) -> bytes:
    """A detached signature document (JSON bytes) over `statement`."""
    public = private.public_key()
    document = {
        "format": SIGNATURE_FORMAT,
        "algorithm": "ed25519",
        "key_id": key_id(public),
        "public_key": base64.b64encode(public.public_bytes(serialization.Encoding.Raw,
                                                           serialization.PublicFormat.Raw)).decode(),
        "statement_sha256": hashlib.sha256(statement).hexdigest(),
        "signature": base64.b64encode(private.sign(statement)).decode(),
    }
    return json.dumps(document, indent=1, sort_keys=True).encode()


@dataclass
class SignatureCheck:
    """What a signature says about a statement, in the user's words."""

    state: str            # "trusted", "untrusted" (valid, key not in [trust] keys), "invalid", "unsigned"
    key_id: str | None = None

    @property
    def accepted(self) -> bool:
        return self.state == "trusted"

    def describe(self) -> str:
        return {
            "trusted": f"signed by trusted key {self.key_id}",
            "untrusted": f"signed by key {self.key_id}, which is not in [trust] keys",
            "invalid": f"its signature does not match its contents (claims key {self.key_id or 'unknown'})",
            "unsigned": "not signed by any key",
        }[self.state]

    def as_dict(self) -> dict:
        return {"state": self.state, "key_id": self.key_id}


def trusted_keys(trust: TrustConfig) -> dict[str, Ed25519PublicKey]:
    keys = [load_public_key(Path(p)) for p in trust.keys]
    return {key_id(k): k for k in keys}


def check(statement: bytes, signature: bytes | None, trust: TrustConfig) -> SignatureCheck:
    """Check a signature document against `statement` and the trusted keys. Never raises on bad input."""
    if signature is None:
        return SignatureCheck("unsigned")
    try:
        document = json.loads(signature)
        claimed = str(document.get("key_id"))
        if document.get("format") != SIGNATURE_FORMAT or document.get("algorithm") != "ed25519":
            return SignatureCheck("invalid", claimed)
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(document["public_key"], validate=True))
        raw_signature = base64.b64decode(document["signature"], validate=True)
    except (ValueError, TypeError, KeyError, AttributeError):
        return SignatureCheck("invalid")
    real_id = key_id(public)
    if claimed != real_id:
        return SignatureCheck("invalid", real_id)
    # Trust is decided by the whole public key, never by its short ID, and a trusted signer's
    # signature is checked with the key from the site's own file, not the one the document carries.
    trusted = next((k for k in trusted_keys(trust).values() if _raw(k) == _raw(public)), None)
    try:
        (trusted or public).verify(raw_signature, statement)
    except InvalidSignature:
        return SignatureCheck("invalid", real_id)
    return SignatureCheck("trusted" if trusted is not None else "untrusted", real_id)


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def refusal(check_: SignatureCheck, trust: TrustConfig) -> str | None:
    """Why this signature is refused here (None: go on). A signature that does not match is always
    refused; unsigned or untrusted only under `require_signature`."""
    if check_.state == "invalid":
        return check_.describe()
    if trust.require_signature and not check_.accepted:
        return check_.describe() + " and [trust] require_signature is set"
    return None
