"""fitscope's Streamlit dashboard: `streamlit run dashboard/app.py` (or `fitscope up`)."""
