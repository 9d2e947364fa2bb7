"""Who is using the dashboard. With FITSCOPE_OIDC_* set (services/signin.py), a visitor who has not
signed in sees only a sign-in page; once signed in, the sidebar says who they are and their identity
is who submits, cancels and re-queues. Without it the dashboard must listen on loopback only, and
writes are recorded as the CLI records them (FITSCOPE_SUBMITTED_BY, else the login name)."""

from __future__ import annotations

import streamlit as st

from dashboard.data import settings
from services import signin
from services.config import ConfigError
from services.safe_text import markdown_text


def require_sign_in() -> None:
    """Stop the page unless the visitor may see it: a sign-in page for a visitor who has not signed
    in, an error box for a dashboard beyond loopback without sign-in. Otherwise adds who is signed in
    (and a sign-out button) to the sidebar."""
    try:
        config = signin.oidc_config(settings())
        if config is None and not signin.is_loopback(str(st.get_option("server.address") or "")):
            raise ConfigError(f"this dashboard listens beyond this machine without sign-in: set "
                              f"{', '.join(signin.SETTINGS)} and start it with `fitscope dashboard`")
    except ConfigError as exc:
        st.error(str(exc), icon=":material/lock:")
        st.stop()
    if config is None:
        return
    if not _streamlit_has_auth():
        st.error("sign-in is configured (FITSCOPE_OIDC_*) but Streamlit was started without it; start the "
                 "dashboard with `fitscope dashboard`, which hands Streamlit its private secrets file",
                 icon=":material/lock:")
        st.stop()
    if not _logged_in():
        _sign_in_page(config.server_metadata_url)
        st.stop()
    with st.sidebar:
        st.caption(f"Signed in as **{markdown_text(identity())}**")
        st.button("Sign out", key="signin_sign_out", icon=":material/logout:", on_click=st.logout)


def identity() -> str | None:
    """The signed-in user's identity (e-mail, else user name, name or subject id), or None when
    sign-in is not configured."""
    if signin.oidc_config(settings()) is None or not _logged_in():
        return None
    return signin.identity(st.user.to_dict())


def _logged_in() -> bool:
    # st.user is a mapping; "is_logged_in" is absent before Streamlit has looked at the identity cookie.
    return bool(st.user.get("is_logged_in", False))


def _streamlit_has_auth() -> bool:
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets file at all: Streamlit raises its own not-found error
        return False


def _sign_in_page(metadata_url: str) -> None:
    from urllib.parse import urlsplit

    st.title("fitscope")
    st.subheader("Sign in to see and run this team's experiments")
    provider = markdown_text(urlsplit(metadata_url).hostname or "")
    st.write(f"This dashboard is shared: you sign in with your account at **{provider}**, "
             "and what you submit, cancel or re-queue is recorded under your name.")
    st.button("Sign in", key="signin_sign_in", type="primary", icon=":material/login:", on_click=st.login)
