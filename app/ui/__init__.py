"""The clinic's Streamlit app: upload a CT, see a result with heatmaps, forward it for review.

Start it with ``python -m app.launch`` (``make run``); the entry script is ``app/ui/main.py``,
which registers one small script per page from ``PAGE_SCRIPTS`` with ``st.navigation``.
"""

from pathlib import Path

BANNER = "Decision support only; requires review by a radiologist"

# The model the app runs: set by ``python -m app.launch`` from its flags, read by app/ui/state.py.
MODEL_ENV, VARIANT_ENV, THREADS_ENV = "MYELOMA_MODEL", "MYELOMA_VARIANT", "MYELOMA_THREADS"

# Not "pages/": Streamlit treats a pages/ folder next to the entry script as an old-style
# multipage app, and a first visit to e.g. /settings would then bypass main.py (no banner,
# no navigation).
PAGE_SCRIPTS = Path(__file__).resolve().parent / "page_scripts"
