"""The Settings page (a script for st.navigation; the page itself is app/ui/settings_page.py)."""

from app.ui.settings_page import render

render()
