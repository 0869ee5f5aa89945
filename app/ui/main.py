"""Streamlit entry point: page set-up, the permanent decision-support banner, navigation.

Run through ``python -m app.launch`` (``make run``), which starts
``streamlit run app/ui/main.py`` from the repository root.
"""

import sys
from pathlib import Path

# `streamlit run` puts only this file's folder on sys.path; the app is imported as a package.
REPO_ROOT = str(Path(__file__).resolve().parents[2])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import streamlit as st  # noqa: E402

from app.ui import BANNER, PAGE_SCRIPTS  # noqa: E402

st.set_page_config(page_title="Myeloma CT - lytic lesion screening", page_icon=":material/radiology:",
                   layout="wide")
page = st.navigation({
    "Clinic": [
        st.Page(PAGE_SCRIPTS / "analyze.py", title="Analyze", icon=":material/radiology:", url_path="analyze", default=True),
        st.Page(PAGE_SCRIPTS / "inbox.py", title="Inbox", icon=":material/inbox:", url_path="inbox"),
        st.Page(PAGE_SCRIPTS / "outbox.py", title="Outbox", icon=":material/outbox:", url_path="outbox"),
        st.Page(PAGE_SCRIPTS / "settings.py", title="Settings", icon=":material/settings:", url_path="settings"),
    ],
    # The teleradiologist's side (app/ui/worklist_page.py, case_page.py): its own server credentials.
    "Teleradiology": [
        st.Page(PAGE_SCRIPTS / "worklist.py", title="Worklist", icon=":material/list_alt:", url_path="worklist"),
        st.Page(PAGE_SCRIPTS / "case.py", title="Case", icon=":material/image_search:", url_path="case"),
    ],
})
st.warning(f"**{BANNER}**", icon=":material/medical_information:")
page.run()
