"""fitscope's dashboard: `fitscope dashboard` (or `streamlit run dashboard/app.py` on loopback). The
sign-in gate (dashboard/signin.py), then a router over the pages in app_pages/ and a sidebar that says
who is signed in and which database and broker this dashboard is looking at."""

from __future__ import annotations

import streamlit as st

from dashboard import data, frames, signin
from services.safe_text import markdown_code

st.set_page_config(page_title="fitscope", layout="wide")
data.settings()  # a bad setting stops the app here, in the main area, with one sentence
signin.require_sign_in()  # before any page or sidebar: a visitor who has not signed in sees nothing else

page = st.navigation([
    st.Page("app_pages/experiments.py", title="Experiments", icon=":material/view_list:", default=True),
    st.Page("app_pages/new_experiment.py", title="New experiment", icon=":material/add_circle:"),
    st.Page("app_pages/experiment.py", title="Experiment", icon=":material/monitoring:"),
    st.Page("app_pages/fit_analysis.py", title="Fit analysis", icon=":material/insights:"),
    st.Page("app_pages/optimizers.py", title="Optimizers and schedules", icon=":material/speed:"),
    st.Page("app_pages/loss_surfaces.py", title="Loss surfaces", icon=":material/landscape:"),
    st.Page("app_pages/trial.py", title="Trial", icon=":material/search:"),
])

with st.sidebar:
    st.caption(f"Database: {markdown_code(data.database_label())}")
    st.caption(f"Broker: {markdown_code(data.broker_label())}")
    st.caption(f"Pages refresh every {data.REFRESH_SECONDS} s.")

page.run()
frames.settle()  # once per process, the libraries the first page imported are set aside (dashboard/frames.py)
