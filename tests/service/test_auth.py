"""API key registry: hashed key file, authentication, roles, model-field parsing."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from softserve.store.types import PromptNotFound, PromptValidationError
from softserve.service.auth import ApiKeyRegistry, Principal, add_key
from softserve.service.tenancy import can_write, parse_reference as tenant_for_model


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_add_key_load_authenticate(tmp_path, suffix):
    path = tmp_path / f"sub/keys{suffix}"
    k1 = add_key(path, "acme")
    k2 = add_key(path, "acme", role="admin")
    k3 = add_key(path, "beta")
    assert k1.startswith("sk-ss-") and len({k1, k2, k3}) == 3
    text = path.read_text()
    for k in (k1, k2, k3):
        assert k not in text and k[6:] not in text  # no plaintext, not even without the prefix
        assert hashlib.sha256(k.encode()).hexdigest() in text
    data = yaml.safe_load(text) if suffix == ".yaml" else json.loads(text)
    assert [e["tenant"] for e in data["keys"]] == ["acme", "acme", "beta"]
    assert (path.stat().st_mode & 0o777) == 0o600

    reg = ApiKeyRegistry.load(path)
    assert len(reg) == 3
    assert reg.authenticate(f"Bearer {k1}") == Principal("acme", "user")
    assert reg.authenticate(f"bearer  {k2} ") == Principal("acme", "admin")
    assert reg.authenticate(f"Bearer {k2}").is_admin
    assert reg.authenticate(f"Bearer {k3}") == Principal("beta", "user")
    for bad in (None, "", "Bearer", "Bearer ", f"Basic {k1}", k1, f"Bearer {k1}x", "Bearer sk-ss-nope"):
        assert reg.authenticate(bad) is None


def test_handwritten_key_file(tmp_path):
    path = tmp_path / "keys.yml"
    digest = hashlib.sha256(b"secret-key").hexdigest()
    path.write_text(yaml.safe_dump({"keys": [{"sha256": digest.upper(), "tenant": "acme", "role": "admin"}]}))
    assert ApiKeyRegistry.load(path).authenticate("Bearer secret-key") == Principal("acme", "admin")


@pytest.mark.parametrize(
    "entry",
    [
        {"sha256": "abc", "tenant": "acme"},
        {"sha256": "0" * 64, "tenant": "../x"},
        {"sha256": "0" * 64, "tenant": "acme", "role": "root"},
        "not-an-object",
    ],
)
def test_invalid_key_file_rejected(tmp_path, entry):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [entry]}))
    with pytest.raises(ValueError):
        ApiKeyRegistry.load(path)


def test_add_key_validates(tmp_path):
    with pytest.raises(ValueError):
        add_key(tmp_path / "k.json", "bad/tenant")
    with pytest.raises(ValueError):
        add_key(tmp_path / "k.json", "acme", role="owner")
    assert not (tmp_path / "k.json").exists()


def test_disabled_mode():
    reg = ApiKeyRegistry.disabled()
    assert reg.authenticate(None) == Principal("default", "admin")
    assert reg.authenticate("Bearer anything").is_admin


def test_empty_registry_rejects_everything(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text("")
    assert ApiKeyRegistry.load(path).authenticate("Bearer x") is None


def test_parse_reference():
    user = Principal("acme", "user")
    assert tenant_for_model(user, "p") == ("acme", "p", None)
    assert tenant_for_model(user, "p@abc123def456") == ("acme", "p", "abc123def456")
    assert tenant_for_model(user, "public/p") == ("public", "p", None)
    assert tenant_for_model(user, "public/p@abc123") == ("public", "p", "abc123")
    assert tenant_for_model(user, "acme/p") == ("acme", "p", None)
    with pytest.raises(PromptNotFound):
        tenant_for_model(user, "beta/p")  # other tenants: 404, not 403
    for bad in ("", "p@", "a@b@c", "public/a/b", "../x", "public/", "/p", "naïve"):
        with pytest.raises((PromptValidationError, PromptNotFound)):
            tenant_for_model(user, bad)


def test_can_write():
    assert can_write(Principal("acme", "user"), "acme")
    assert not can_write(Principal("acme", "user"), "public")
    assert can_write(Principal("acme", "admin"), "public")
    assert not can_write(Principal("acme", "admin"), "beta")
