"""What the pages share: the cached model, the model choice, server settings, and error handling.

The model is loaded once per (model, variant, threads) for the whole server
(``st.cache_resource``) and survives reruns; analyses take turns on it (see
``jobs.SharedModel``). Everything per user lives in ``st.session_state``.

Model choice: ``MYELOMA_MODEL`` (registry name, model folder or .tflite file; default:
the registry's default), ``MYELOMA_VARIANT`` and ``MYELOMA_THREADS`` set the defaults
(``python -m app.launch`` sets them from its flags); the Settings page can change
variant and threads for a session.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

import streamlit as st

from app.domain import AppError
from app.engine import Analyzer
from app.settings import ENV_PASSWORD, ENV_TOKEN, ENV_URL, ENV_USER, ServerSettings, resolve_settings
from app.ui import MODEL_ENV, THREADS_ENV, VARIANT_ENV
from app.ui.jobs import RecentJobs, SharedModel

log = logging.getLogger(__name__)

SECRET_KEYS = (ENV_URL, ENV_USER, ENV_PASSWORD, ENV_TOKEN)
UNEXPECTED = "Something went wrong on this page. The technical details are in the app log; please report this."

# st.session_state keys
VARIANT_KEY, THREADS_KEY = "model_variant", "model_threads"
SESSION_PASSWORD_KEY = "session_password"


@dataclass(frozen=True)
class ModelChoice:
    model: str | None
    variant: str | None
    threads: int | None


def _env_threads(env: Mapping[str, str]) -> int | None:
    raw = env.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise AppError(f"{THREADS_ENV}={raw!r} is not a positive whole number of threads")
    return int(raw)


def model_choice() -> ModelChoice:
    """The environment's defaults, overridden by this session's Settings page choices."""
    env = os.environ
    return ModelChoice(
        model=env.get(MODEL_ENV) or None,
        variant=st.session_state.get(VARIANT_KEY) or env.get(VARIANT_ENV) or None,
        threads=st.session_state.get(THREADS_KEY) or _env_threads(env),
    )


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def _shared_model(model: str | None, variant: str | None, threads: int | None) -> SharedModel:
    return SharedModel(Analyzer(model, variant, threads))


LOCAL_ADDRESSES = frozenset({"localhost", "127.0.0.1", "::1"})


@st.cache_resource
def _recent_jobs() -> RecentJobs:
    return RecentJobs()


def recent_jobs() -> RecentJobs | None:
    """This app's last analyses, to reopen after a browser refresh; None unless the app serves this
    computer only (``make run``'s default): another computer's user must not see this one's
    patients, and a plain ``streamlit run`` (no address) listens on every interface."""
    return _recent_jobs() if str(st.get_option("server.address")) in LOCAL_ADDRESSES else None


def current_model() -> SharedModel:
    """The loaded model for this session's choice. Raises ModelLoadError (an AppError) with what to do."""
    choice = model_choice()
    return _shared_model(choice.model, choice.variant, choice.threads)


# --- teleradiology server -----------------------------------------------------------------


def secret_values(keys: tuple[str, ...] = SECRET_KEYS) -> dict[str, str]:
    """The ``keys`` (default: the clinic's ``TELERAD_*``) found in ``.streamlit/secrets.toml``; {} without one."""
    try:
        secrets = st.secrets.to_dict()
    except FileNotFoundError:  # no secrets file (StreamlitSecretNotFoundError is one)
        return {}
    return {k: str(secrets[k]) for k in keys if isinstance(secrets.get(k), str | int | float)}


def server_settings() -> ServerSettings:
    """Settings file < environment < secrets.toml (Streamlit exports its secrets to the environment
    too, so it wins there as well) < what this session typed on the Settings page."""
    settings = resolve_settings(env={**os.environ, **secret_values()})
    typed = st.session_state.get(SESSION_PASSWORD_KEY)
    return replace(settings, password=typed) if typed else settings


def credential_source(settings_value: str, key: str) -> str:
    """Where a secret came from, for display only (never the value)."""
    if st.session_state.get(SESSION_PASSWORD_KEY) and key == ENV_PASSWORD:
        return "typed for this session"
    if secret_values((key,)):
        return ".streamlit/secrets.toml"
    if os.environ.get(key):
        return f"environment ({key})"
    return "settings file" if settings_value else "not set"


def masked(secret: str) -> str:
    """A secret as the page may show it: never any of its characters."""
    return "•" * 8 if secret else "(not set)"


# --- errors -------------------------------------------------------------------------------


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Wrap a page body: AppError messages are shown as they are, anything else generically.

    Streamlit's rerun/stop signals derive from BaseException and pass through.
    """
    try:
        yield
    except AppError as exc:
        st.error(str(exc))
    except Exception:
        log.exception("page failed")
        st.error(UNEXPECTED)
