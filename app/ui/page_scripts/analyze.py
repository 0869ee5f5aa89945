"""The Analyze page (a script for st.navigation; the page itself is app/ui/analyze_page.py)."""

from app.ui.analyze_page import render

render()
