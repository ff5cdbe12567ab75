"""Whether wandb will find credentials for its server, looked up where wandb looks (without importing it), so
that `quietdepth fit` and `quietdepth-eval --wandb-project` run offline only where it would ask to log in."""

from __future__ import annotations

import configparser
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_SERVER = "https://api.wandb.ai"


def server_url() -> str:
    """The W&B server runs go to: `WANDB_BASE_URL`, else the `base_url` that `wandb login --host` wrote to
    wandb's settings file (`$WANDB_CONFIG_DIR/settings`, default ~/.config/wandb/settings), else api.wandb.ai."""
    if url := os.environ.get("WANDB_BASE_URL"):
        return url
    settings = configparser.ConfigParser()
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
    try:
        settings.read(config_dir / "settings")
    except configparser.Error:
        return DEFAULT_SERVER  # wandb too ignores a settings file it cannot parse
    return settings.get("default", "base_url", fallback=None) or DEFAULT_SERVER


def has_credentials() -> bool:
    """Whether `WANDB_API_KEY` (or `WANDB_IDENTITY_TOKEN_FILE`) is set, or the netrc file (`$NETRC`, default
    ~/.netrc) has a password for the host of `server_url()`."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(path).authenticators(urlsplit(server_url()).netloc)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])
