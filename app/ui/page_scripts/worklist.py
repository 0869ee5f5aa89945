"""The Worklist page (a script for st.navigation; the page itself is app/ui/worklist_page.py)."""

from app.ui.worklist_page import render

render()
