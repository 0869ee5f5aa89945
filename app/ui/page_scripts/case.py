"""The Case page (a script for st.navigation; the page itself is app/ui/case_page.py)."""

from app.ui.case_page import render

render()
