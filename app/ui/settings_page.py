"""Settings page: the teleradiology server (URL, user, credentials' source, test) and the model run.

Secrets (password, token) are never sent to the browser: the page shows only where
they come from. They belong in the environment (``TELERAD_PASSWORD`` ...) or in
``.streamlit/secrets.toml``; a password typed here is kept for this session only.
"""

from __future__ import annotations

import os
from dataclasses import replace

import streamlit as st

from app.dicomweb import DicomWebClient
from app.domain import AppError
from app.settings import (
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_URL,
    ServerSettings,
    load_settings_file,
    save_server_settings,
    settings_path,
    split_credentials,
)
from app.ui.state import (
    SESSION_PASSWORD_KEY,
    THREADS_KEY,
    VARIANT_KEY,
    credential_source,
    current_model,
    friendly_errors,
    masked,
    model_choice,
    secret_values,
    server_settings,
)

# A study UID no server holds: the probe query must succeed and find nothing.
PROBE_STUDY_UID = "2.25.0"
PROBE_TIMEOUT_S = 10.0


def check_connection(settings: ServerSettings) -> str:
    """One QIDO-RS query without retries; raises DicomWebError (an AppError) with the reason."""
    quick = replace(settings.require_url(), retry_attempts=1,
                    read_timeout_s=min(settings.read_timeout_s, PROBE_TIMEOUT_S))
    with DicomWebClient(quick) as client:
        client.search_studies(StudyInstanceUID=PROBE_STUDY_UID)
    who = f" as {settings.user}" if settings.user and not settings.token else ""
    return f"Connected to {settings.url}{who}: the DICOMweb service answered and accepted the credentials."


def render() -> None:
    st.title("Settings")
    with friendly_errors():
        _server()
    with friendly_errors():
        _analysis()


def _server() -> None:
    st.subheader("Teleradiology server")
    settings = server_settings()
    with st.form("server_form"):
        url = st.text_input("DICOMweb URL", value=settings.url, placeholder="https://telerad.example.org/dicom-web")
        user = st.text_input("User", value=settings.user)
        deidentify = st.checkbox("De-identify before sending (recommended)", value=settings.deidentify)
        saved = st.form_submit_button("Save")
    if saved:
        _save(url, user, deidentify)
        settings = server_settings()
    if os.environ.get(ENV_URL) or ENV_URL in secret_values():
        st.caption(f"{ENV_URL} is set ({credential_source(settings.url, ENV_URL)}); it overrides the saved URL.")

    st.markdown(f"**Password**: {_secret_line(settings.password, ENV_PASSWORD)}  \n"
                f"**Token**: {_secret_line(settings.token, ENV_TOKEN)}")
    st.caption("Put credentials in the environment (TELERAD_USER, TELERAD_PASSWORD or TELERAD_TOKEN) or in "
               ".streamlit/secrets.toml under the same names. They are never shown here.")
    st.text_input("Password for this session only (not saved)", type="password", key=SESSION_PASSWORD_KEY,
                  persist_state="session")  # kept when the user moves on to Analyze or the Outbox

    if st.button("Test connection", key="test_connection"):
        with st.spinner("Contacting the server…"):
            st.success(check_connection(server_settings()))


def _secret_line(value: str, key: str) -> str:
    return f"{masked(value)} ({credential_source(value, key)})" if value else masked(value)


def _save(url: str, user: str, deidentify: bool) -> None:
    clean_url, url_user, url_password = split_credentials(url)
    if url_user or url_password:
        st.error("The URL contains credentials. Enter the user in the User field and keep the password in "
                 "TELERAD_PASSWORD or .streamlit/secrets.toml. Nothing was saved.")
        return
    saved = ServerSettings(**load_settings_file())
    updated = replace(saved, url=clean_url.strip(), user=user.strip(), deidentify=deidentify)
    if updated.url:
        updated.require_url()  # raises AppError with what is wrong; nothing is saved then
    path = save_server_settings(updated)  # secrets already in the file stay; none are added
    st.success(f"Saved to {path}.")


def _analysis() -> None:
    st.subheader("Analysis")
    choice = model_choice()
    card = current_model().analyzer.card
    variants = sorted(card.variants, key=lambda v: (v != card.default_variant, v))
    active = choice.variant or card.default_variant
    st.markdown(f"Model **{card.name} {card.version}** "
                f"({'from MYELOMA_MODEL' if choice.model else 'the registered default'}).")
    with st.form("analysis_form"):
        variant = st.selectbox(
            "Model variant", variants, index=variants.index(active) if active in variants else 0,
            format_func=lambda v: f"{v} ({card.variants[v].kind})" + (" - card default" if v == card.default_variant
                                                                      else ""))
        threads = st.number_input("CPU threads for inference", min_value=1, max_value=max(1, os.cpu_count() or 1),
                                  value=min(choice.threads or current_model().analyzer.threads, os.cpu_count() or 1),
                                  step=1)
        applied = st.form_submit_button("Apply")
    if applied:
        previous = {key: st.session_state.get(key) for key in (VARIANT_KEY, THREADS_KEY)}
        st.session_state[VARIANT_KEY] = variant
        st.session_state[THREADS_KEY] = int(threads)
        try:
            loaded = current_model().analyzer
        except AppError as exc:  # e.g. a variant file that is missing or corrupt: keep the model that works
            st.session_state.update(previous)
            st.error(f"{exc}. The session keeps its previous choice.")
            return
        st.success(f"Using {loaded.model_ref.variant} with {loaded.threads} thread(s) for this session.")
    if card.default_variant_reason:
        st.caption(f"Card default: {card.default_variant_reason}")
    st.caption(f"Settings file: {settings_path()}")
