"""W&B credentials are looked for where wandb looks, so that a run goes offline only where wandb would ask to log in."""

from __future__ import annotations

import os

import pytest

from evals.wandb_auth import has_credentials
from training.cli import run


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty home: no key in the environment, no netrc, no wandb settings."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_CONFIG_DIR", "NETRC",
                 "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_nothing_found_in_an_empty_home(home):
    assert not has_credentials()


def test_an_api_key_in_the_environment_counts(home, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert has_credentials()


def test_a_netrc_entry_for_api_wandb_ai_counts(home):
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert has_credentials()


def test_a_netrc_entry_for_another_host_does_not_count(home):
    (home / ".netrc").write_text("machine github.com login user password secret  # api.wandb.ai\n")
    assert not has_credentials()


def test_the_netrc_file_named_by_NETRC_is_read(home, monkeypatch):
    netrc = home / "elsewhere" / "netrc"
    netrc.parent.mkdir()
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert not has_credentials()
    monkeypatch.setenv("NETRC", str(netrc))
    assert has_credentials()


def test_a_self_hosted_server_in_WANDB_BASE_URL_is_looked_up_in_netrc(home, monkeypatch):
    (home / ".netrc").write_text("machine wandb.example.com:8080 login user password " + "k" * 40 + "\n")
    assert not has_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com:8080")
    assert has_credentials()


def test_a_self_hosted_server_that_wandb_login_host_saved_is_looked_up_in_netrc(home, monkeypatch):
    """`wandb login --host URL` writes the key to netrc and the URL to wandb's settings file."""
    (home / ".netrc").write_text("machine wandb.example.com login user password " + "k" * 40 + "\n")
    (home / ".config" / "wandb").mkdir(parents=True)
    (home / ".config" / "wandb" / "settings").write_text("[default]\nbase_url = https://wandb.example.com\n")
    assert has_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")  # the environment wins over the file
    assert not has_credentials()


def test_quietdepth_fit_stays_online_for_a_self_hosted_servers_netrc_entry(home, monkeypatch):
    """The key check looked for the text 'api.wandb.ai' in ~/.netrc only, so a self-hosted server's user
    with a key in netrc got offline runs."""
    (home / ".netrc").write_text("machine wandb.example.com login user password " + "k" * 40 + "\n")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    with pytest.raises(SystemExit):
        run(["fit", "--help"])
    assert "WANDB_MODE" not in os.environ


def test_quietdepth_fit_goes_offline_without_credentials(home, capsys):
    with pytest.raises(SystemExit):
        run(["fit", "--help"])
    assert os.environ["WANDB_MODE"] == "offline"
