"""The teleradiology pages in one navigation, for AppTest (the same st.Page lines the app's main.py gets)."""

import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import streamlit as st  # noqa: E402

from app.ui import PAGE_SCRIPTS as PAGES  # noqa: E402

page = st.navigation([
    st.Page(PAGES / "worklist.py", title="Worklist", icon=":material/checklist:", url_path="worklist", default=True),
    st.Page(PAGES / "case.py", title="Case", icon=":material/image_search:", url_path="case"),
    st.Page(PAGES / "inbox.py", title="Inbox", icon=":material/inbox:", url_path="inbox"),
])
page.run()
