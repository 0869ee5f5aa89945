"""The Inbox page (a script for st.navigation; the page itself is app/ui/inbox_page.py)."""

from app.ui.inbox_page import render

render()
