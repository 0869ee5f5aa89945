"""The Outbox page (a script for st.navigation; the page itself is app/ui/outbox_page.py)."""

from app.ui.outbox_page import render

render()
