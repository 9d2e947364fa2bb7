"""Shared by the dashboard tests."""

from __future__ import annotations

import pytest
import streamlit as st


@pytest.fixture(autouse=True)
def _fresh_streamlit_caches():
    """Each test has its own database and broker: drop cached engines (disposing them), producers
    and query results after it."""
    yield
    st.cache_data.clear()
    st.cache_resource.clear()
