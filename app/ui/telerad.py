"""What the teleradiology pages (Worklist, Case, Inbox) share: the reader's connection and identity,
the session caches, and the page scripts they switch between.

The reader connects with its own credentials (``app.settings.resolve_reader_settings``:
``TELERAD_READER_*`` in the environment or ``.streamlit/secrets.toml``, the ``"reader"`` object of
the settings file, or a password typed for this session). The radiologist's name and
organisation, which sign the reads and the audit log, come from ``TELERAD_READER_NAME`` and
``TELERAD_READER_ORGANIZATION`` or are typed on the page.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import replace
from datetime import datetime

import streamlit as st

from app.case_images import InstanceCache
from app.dicomweb import DicomWebClient
from app.settings import READER_ENV_PREFIX, ServerSettings, resolve_reader_settings
from app.ui import PAGE_SCRIPTS
from app.ui.state import credential_source, masked
from app.worklist import SrContent, WorklistEntry, fetch_worklist

WORKLIST_PAGE, CASE_PAGE, INBOX_PAGE = (PAGE_SCRIPTS / f"{name}.py" for name in ("worklist", "case", "inbox"))
READER_NAME_ENV, READER_ORGANIZATION_ENV = f"{READER_ENV_PREFIX}NAME", f"{READER_ENV_PREFIX}ORGANIZATION"
READER_SECRET_KEYS = tuple(f"{READER_ENV_PREFIX}{key}" for key in ("URL", "USER", "PASSWORD", "TOKEN"))

# st.session_state keys
READER_NAME_KEY, READER_ORGANIZATION_KEY = "reader_name", "reader_organization"
READER_PASSWORD_KEY = "reader_session_password"
CASE_KEY = "telerad_case"  # Study Instance UID of the case open in the Case page
ENTRIES_KEY = "worklist_entries"  # the last worklist fetched (list[WorklistEntry])
SR_CACHE_KEY, IMAGE_CACHE_KEY = "worklist_sr_cache", "case_image_cache"


def _reader_secrets() -> dict[str, str]:
    try:
        secrets = st.secrets.to_dict()
    except FileNotFoundError:  # no secrets file
        return {}
    return {k: str(secrets[k]) for k in READER_SECRET_KEYS if isinstance(secrets.get(k), str | int | float)}


def reader_settings() -> ServerSettings:
    """The worklist's connection: settings file < environment < secrets.toml < password typed now."""
    settings = resolve_reader_settings(env={**os.environ, **_reader_secrets()})
    typed = st.session_state.get(READER_PASSWORD_KEY)
    return replace(settings, password=typed) if typed else settings


def reader_identity() -> tuple[str, str]:
    """(name, organisation) of the radiologist using this session ("" when not given yet)."""
    st.session_state.setdefault(READER_NAME_KEY, os.environ.get(READER_NAME_ENV, ""))
    st.session_state.setdefault(READER_ORGANIZATION_KEY, os.environ.get(READER_ORGANIZATION_ENV, ""))
    return st.session_state[READER_NAME_KEY].strip(), st.session_state[READER_ORGANIZATION_KEY].strip()


def reader_panel() -> None:
    """Who is reading and how the page reaches the server (secrets only masked)."""
    name, _ = reader_identity()
    settings = reader_settings()
    with st.expander("Reader and connection", expanded=not name):
        st.text_input("Your name as it signs reports (Family^Given)", key=READER_NAME_KEY, placeholder="Curie^Marie",
                      persist_state="session")
        st.text_input("Reading organisation", key=READER_ORGANIZATION_KEY, persist_state="session")
        password_key = f"{READER_ENV_PREFIX}PASSWORD"
        st.markdown(f"**Server**: {settings.url or '(not set)'}  \n**Reader user**: {settings.user or '(not set)'}  \n"
                    f"**Password**: {masked(settings.password)} ({_password_source(settings, password_key)})")
        st.text_input("Reader password for this session only (not saved)", type="password", key=READER_PASSWORD_KEY,
                      persist_state="session")
        st.caption(f"Set the reader's own credentials in {READER_ENV_PREFIX}URL / {READER_ENV_PREFIX}USER / "
                   f"{READER_ENV_PREFIX}PASSWORD (environment or .streamlit/secrets.toml) or in the \"reader\" "
                   "object of the settings file.")


def _password_source(settings: ServerSettings, key: str) -> str:
    if st.session_state.get(READER_PASSWORD_KEY):
        return "typed for this session"
    if key in _reader_secrets():
        return ".streamlit/secrets.toml"
    return credential_source(settings.password, key).replace("settings file", "settings file (reader)")


def sr_cache() -> dict[str, SrContent]:
    return st.session_state.setdefault(SR_CACHE_KEY, {})


def image_cache() -> InstanceCache:
    if IMAGE_CACHE_KEY not in st.session_state:
        st.session_state[IMAGE_CACHE_KEY] = InstanceCache()
    return st.session_state[IMAGE_CACHE_KEY]


def worklist_entries() -> list[WorklistEntry]:
    return st.session_state.get(ENTRIES_KEY, [])


CLINIC_USER_KEY = "inbox_user"


def clinic_user() -> str:
    """Who uses the clinic's inbox (for the audit log): typed on the page, default the login name."""
    if CLINIC_USER_KEY not in st.session_state:
        try:
            st.session_state[CLINIC_USER_KEY] = getpass.getuser()
        except (KeyError, OSError):
            st.session_state[CLINIC_USER_KEY] = ""
    return st.session_state[CLINIC_USER_KEY].strip()


def fetch_entries(client: DicomWebClient) -> list[WorklistEntry]:
    """The server's worklist (several queries on a slow uplink: the user sees that it is loading)."""
    with st.spinner("Loading the worklist from the server..."):
        entries = fetch_worklist(client, sr_cache())
    st.session_state[ENTRIES_KEY] = entries
    return entries


def case_name(entry: WorklistEntry) -> str:
    """How pickers name a case. The pseudonymous patient alone is not enough: two studies of one
    patient share it, so the arrival and the end of the study UID tell them apart."""
    return (f"{entry.case_ref} - {entry.clinic} - arrived {local_time(entry.arrived_at)} - "
            f"study ...{entry.study_uid[-6:]}")


def local_time(when: datetime | None) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M") if when else "-"


def waited(seconds: float) -> str:
    """A waiting time as people say it: 45 min, 3 h 10 min, 2 d 4 h."""
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"
