from pathlib import Path

import pytest

from envmgr.core.config import host_apt_mirror, load_config
from envmgr.core.credentials import mask_url
from envmgr.core.errors import UsageError


def test_layers_file_then_environment_then_flags(tmp_path, monkeypatch):
    system = tmp_path / "system.toml"
    system.write_text('base_dir = "/srv/a"\n[mirrors]\npypi = "http://sys/simple"\napt = "http://apt-sys/deb"\n')
    user = tmp_path / "user.toml"
    user.write_text('[mirrors]\npypi = "http://user/simple"\n')
    monkeypatch.setenv("ENVMGR_BASE_DIR", "/srv/env")
    config = load_config({"mirrors": {"apt": "http://flag/deb"}}, files=[system, user], inherit_host=False)
    assert config.mirrors.pypi == "http://user/simple"
    assert config.origins["mirrors.pypi"] == f"config {user}"
    assert config.base_dir == Path("/srv/env") and config.origins["base_dir"] == "environment ENVMGR_BASE_DIR"
    assert config.mirrors.apt == "http://flag/deb" and config.origins["mirrors.apt"] == "command-line flag"


def test_unknown_key_names_file_key_and_line(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text('[mirrors]\npypi = "http://x/simple"\npypy = "typo"\n')
    with pytest.raises(UsageError) as err:
        load_config(files=[bad], inherit_host=False)
    assert f"{bad}:3: key 'mirrors.pypy': unknown key" in str(err.value)


def test_malformed_toml_names_the_line(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text('[mirrors]\npypi = \n')
    with pytest.raises(UsageError) as err:
        load_config(files=[bad], inherit_host=False)
    assert str(bad) in str(err.value) and "line 2" in str(err.value)


def test_wrong_type_says_what_was_expected(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text('[mirrors]\nextra_indexes = "not-a-list"\n')
    with pytest.raises(UsageError) as err:
        load_config(files=[bad], inherit_host=False)
    assert "mirrors.extra_indexes" in str(err.value) and "list" in str(err.value)


def test_inherits_host_pip_index_and_ca(tmp_path, monkeypatch):
    pip_conf = tmp_path / "pip.conf"
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    pip_conf.write_text(f"[global]\nindex-url = https://u:pw@mirror.invalid/simple\ncert = {ca}\n"
                        "extra-index-url = file:///opt/local https://extra.invalid/simple\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(pip_conf))
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CERT", "XDG_CONFIG_DIRS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(files=[])
    assert config.mirrors.pypi == "https://u:pw@mirror.invalid/simple"
    assert config.origins["mirrors.pypi"].startswith("inherited: pip config")
    assert config.mirrors.extra_indexes == ["https://extra.invalid/simple"]  # file:// is not reachable from containers
    assert config.mirrors.ca_bundle == str(ca)
    assert "pw" in config.secrets() and "u:pw" in config.secrets()


def test_mask_url_hides_only_the_password():
    assert mask_url("https://user:secret@host:8080/simple/") == "https://user:***@host:8080/simple/"
    assert mask_url("https://host/simple/") == "https://host/simple/"


def test_apt_mirror_from_deb822_and_one_line_sources(tmp_path, monkeypatch):
    import envmgr.core.config as config_module

    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://apt.invalid/deb\nSuites: bookworm bookworm-updates\n"
                       "Components: main\n\nTypes: deb\nURIs: http://apt.invalid/deb-security\n"
                       "Suites: bookworm-security\n")
    real_is_file, real_is_dir = Path.is_file, Path.is_dir

    monkeypatch.setattr(Path, "is_file", lambda p: False if str(p) == "/etc/apt/sources.list" else real_is_file(p))
    monkeypatch.setattr(Path, "is_dir", lambda p: real_is_dir(tmp_path) if str(p) == "/etc/apt/sources.list.d"
                        else real_is_dir(p))
    monkeypatch.setattr(Path, "iterdir", lambda p: iter([sources]))
    found = config_module.host_apt_mirror("bookworm")
    assert found.value == "http://apt.invalid/deb"
    assert host_apt_mirror is config_module.host_apt_mirror
