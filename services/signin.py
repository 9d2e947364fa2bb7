"""Dashboard sign-in with OpenID Connect (Streamlit's st.login), configured from the environment.

The five FITSCOPE_OIDC_* settings go together. Sign-in is required whenever the dashboard listens
beyond loopback (FITSCOPE_BIND_HOST is not 127.0.0.1, ::1 or localhost): anyone who can reach it
could otherwise submit, cancel and re-queue every team member's experiments. On loopback alone
(`fitscope up`, `make up`) it stays sign-in free unless configured.

Streamlit reads its [auth] settings only from a secrets file, so the launcher writes one (mode 0600,
in a 0700 folder under FITSCOPE_HOME) and points Streamlit at it; the secrets never reach a command
line or a message.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from services.config import ConfigError, Settings

CALLBACK_PATH = "/oauth2callback"  # the path Streamlit serves the provider's answer on
MIN_COOKIE_SECRET_CHARS = 32
SECRETS_FILE = "dashboard-secrets.toml"  # in FITSCOPE_HOME/private
MAX_IDENTITY_CHARS = 200  # Experiment.submitted_by / cancelled_by / requeued_by are String(200)
SETTINGS = ("FITSCOPE_OIDC_SERVER_METADATA_URL", "FITSCOPE_OIDC_CLIENT_ID", "FITSCOPE_OIDC_CLIENT_SECRET",
            "FITSCOPE_OIDC_REDIRECT_URI", "FITSCOPE_OIDC_COOKIE_SECRET")


@dataclass(frozen=True)
class OidcConfig:
    """Streamlit's [auth] section. repr hides the two secrets."""

    server_metadata_url: str
    client_id: str
    client_secret: str
    redirect_uri: str
    cookie_secret: str

    def __repr__(self) -> str:
        return (f"OidcConfig(server_metadata_url={self.server_metadata_url!r}, client_id={self.client_id!r}, "
                f"redirect_uri={self.redirect_uri!r}, client_secret=***, cookie_secret=***)")


def is_loopback(host: str) -> bool:
    """Whether a listen address reaches this machine only (0.0.0.0 and "" listen everywhere)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def oidc_config(settings: Settings) -> OidcConfig | None:
    """The sign-in settings, or None when none is set. Raises ConfigError (one sentence naming the
    variables) when only some are set or one is unusable."""
    values = {
        "FITSCOPE_OIDC_SERVER_METADATA_URL": settings.oidc_server_metadata_url,
        "FITSCOPE_OIDC_CLIENT_ID": settings.oidc_client_id,
        "FITSCOPE_OIDC_CLIENT_SECRET": settings.oidc_client_secret and settings.oidc_client_secret.get_secret_value(),
        "FITSCOPE_OIDC_REDIRECT_URI": settings.oidc_redirect_uri,
        "FITSCOPE_OIDC_COOKIE_SECRET": settings.oidc_cookie_secret and settings.oidc_cookie_secret.get_secret_value(),
    }
    missing = [name for name, value in values.items() if not value]
    if len(missing) == len(values):
        return None
    if missing:
        raise ConfigError(f"dashboard sign-in is half configured: set {', '.join(missing)} as well (or unset every "
                          "FITSCOPE_OIDC_* setting)")
    metadata = values["FITSCOPE_OIDC_SERVER_METADATA_URL"].strip()
    if urlsplit(metadata).scheme not in ("http", "https") or not urlsplit(metadata).netloc:
        raise ConfigError("FITSCOPE_OIDC_SERVER_METADATA_URL is not an http(s) URL; use your provider's discovery "
                          "document, e.g. https://accounts.google.com/.well-known/openid-configuration")
    redirect = urlsplit(values["FITSCOPE_OIDC_REDIRECT_URI"].strip())
    if redirect.scheme not in ("http", "https") or not redirect.netloc or redirect.path != CALLBACK_PATH:
        raise ConfigError(f"FITSCOPE_OIDC_REDIRECT_URI must be the dashboard's address followed by {CALLBACK_PATH}, "
                          f"e.g. https://fitscope.example.org{CALLBACK_PATH}, and registered at the provider")
    if len(values["FITSCOPE_OIDC_COOKIE_SECRET"]) < MIN_COOKIE_SECRET_CHARS:
        raise ConfigError(f"FITSCOPE_OIDC_COOKIE_SECRET is shorter than {MIN_COOKIE_SECRET_CHARS} characters; "
                          "generate one with `openssl rand -hex 32`")
    return OidcConfig(server_metadata_url=metadata, client_id=values["FITSCOPE_OIDC_CLIENT_ID"].strip(),
                      client_secret=values["FITSCOPE_OIDC_CLIENT_SECRET"],
                      redirect_uri=values["FITSCOPE_OIDC_REDIRECT_URI"].strip(),
                      cookie_secret=values["FITSCOPE_OIDC_COOKIE_SECRET"])


def required_config(settings: Settings) -> OidcConfig | None:
    """:func:`oidc_config`, refusing (ConfigError) a dashboard that would listen beyond loopback
    without sign-in."""
    config = oidc_config(settings)
    if config is None and not is_loopback(settings.bind_host):
        raise ConfigError(
            f"the dashboard would listen on {settings.bind_host}, beyond this machine, without sign-in: set "
            f"{', '.join(SETTINGS)} (README \"Signing in\"), or set FITSCOPE_BIND_HOST=127.0.0.1")
    return config


def streamlit_args(settings: Settings) -> list[str]:
    """The `streamlit run` options for sign-in: none without it; with it, the private secrets file
    (written now) that holds Streamlit's [auth] section. Raises ConfigError as :func:`required_config`."""
    config = required_config(settings)
    if config is None:
        (settings.home / "private" / SECRETS_FILE).unlink(missing_ok=True)  # secrets of a sign-in since removed
        return []
    return ["--secrets.files", str(write_secrets_file(config, folder=settings.home / "private"))]


def write_secrets_file(config: OidcConfig, *, folder: Path) -> Path:
    """Streamlit's secrets.toml with the [auth] section, readable by this user only (folder 0700,
    file 0600, also when they existed before with wider modes)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / SECRETS_FILE
    lines = ["[auth]"] + [f"{key} = {_toml_string(getattr(config, key))}" for key in
                          ("redirect_uri", "cookie_secret", "client_id", "client_secret", "server_metadata_url")]
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write("\n".join(lines) + "\n")
    return path


def _toml_string(value: str) -> str:
    # A JSON string is a TOML basic string when nothing is escaped as a UTF-16 surrogate pair
    # (ensure_ascii=False keeps non-ASCII characters as they are).
    return json.dumps(value, ensure_ascii=False)


def identity(claims: Mapping[str, object]) -> str | None:
    """Who a signed-in user is, as recorded on experiments: the e-mail address, else the
    preferred user name, the name, or the provider's subject id."""
    for claim in ("email", "preferred_username", "name", "sub"):
        value = claims.get(claim)
        if isinstance(value, str) and value.strip():
            return value.strip().replace("\x00", "")[:MAX_IDENTITY_CHARS]
    return None
