"""Shared by the dashboard tests."""

from __future__ import annotations

import pytest
import streamlit as st


@pytest.fixture(autouse=True)
def _fresh_streamlit_caches():
    """Each test has its own database and broker: drop cached engines (disposing them), producers
    and query results after it."""
    from dashboard import frames

    yield
    st.cache_data.clear()
    st.cache_resource.clear()
    frames.forget()


@pytest.fixture(autouse=True)
def _served_on_loopback():
    """AppTest serves nothing, but the app refuses an address beyond loopback without sign-in
    (dashboard/signin.py); run it as `fitscope up` serves it."""
    from streamlit import config  # st.set_option refuses server options; the command line sets them

    previous = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield
    config.set_option("server.address", previous)
