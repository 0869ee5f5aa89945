"""Outbox page: forwarded cases with their delivery state, and "retry now".

Everything comes from ``app.forward`` (the same calls as ``python -m app.cli outbox``).
"""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from app.domain import AppError
from app.forward import open_outbox, queued_elsewhere, retarget_case
from app.outbox import CaseInfo, CaseState, Outbox
from app.ui.forwarding import RetryTask
from app.ui.state import friendly_errors, server_settings

RETRY_KEY = "outbox_retry"  # the running RetryTask of this session
RETRY_POLL_S = 1.0


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def case_rows(cases: list[CaseInfo]) -> pd.DataFrame:
    """The outbox as a table (no patient data: the summary holds only the AI call)."""
    return pd.DataFrame([{
        "Case": c.case_id,
        "Created": _when(c.created_at),
        "State": str(c.state),
        "On server": f"{c.n_confirmed}/{c.n_items}",
        "Tries": c.attempts,
        "Next try": _when(c.next_attempt_at) if c.state == CaseState.QUEUED and c.attempts else "-",
        "Last error": (c.last_error or "") if c.state == CaseState.QUEUED else "",
        "Result": c.summary,
        "Destination": c.destination,
        "De-identified": "yes" if c.deidentified else "NO (patient identity sent)",
    } for c in cases])


def render() -> None:
    st.title("Outbox")
    st.caption("Forwarded cases stay here until the server confirms every object, across app restarts.")
    with friendly_errors():
        _page()


def _page() -> None:
    task: RetryTask | None = st.session_state.get(RETRY_KEY)
    if task is not None and task.finished:
        st.session_state.pop(RETRY_KEY)
        _retry_outcome(task)
        task = None
    with open_outbox() as outbox:
        if task is None:
            _offer_retarget(outbox)
        queued = outbox.cases(state=CaseState.QUEUED)
        if queued and task is None:
            labels = {c.case_id: f"{c.case_id} - {c.summary}" for c in queued}
            case_id = st.selectbox("Queued case", list(labels), format_func=labels.__getitem__, key="outbox_case")
            if st.button("Retry now", key="retry_now", type="primary"):
                task = st.session_state[RETRY_KEY] = RetryTask(case_id, server_settings()).start()
        cases = outbox.cases()
    if task is not None:
        _retry_progress(task)
    if not cases:
        st.info("The outbox is empty. Use 'Forward for review' on a result to send a case.")
        return
    waiting = sum(c.state == CaseState.QUEUED for c in cases)
    st.markdown(f"{len(cases)} case(s): **{waiting} queued**, {len(cases) - waiting} delivered.")
    st.dataframe(case_rows(cases), hide_index=True, width="stretch")


def _offer_retarget(outbox: Outbox) -> None:
    """Cases queued for another address than the one in Settings (e.g. a mistyped one) wait for a
    server the app no longer sends to: offer to send them to the configured server instead."""
    settings = server_settings()
    elsewhere = queued_elsewhere(outbox, settings)
    if not elsewhere:
        return
    old = ", ".join(sorted({c.destination for c in elsewhere}))
    st.warning(f"{len(elsewhere)} queued case(s) are meant for {old}, not for the server in Settings "
               f"({settings.url}); they are not sent until you move them.", icon=":material/alt_route:")
    if not st.button(f"Send them to {settings.url} instead", key="outbox_retarget"):
        return
    for case in elsewhere:
        try:
            if retarget_case(case.case_id, settings, outbox):
                st.success(f"Case {case.case_id} now goes to {settings.url}; send it with Retry now.")
            else:
                st.success(f"Case {case.case_id} was removed: the study is already queued for or delivered to "
                           f"{settings.url}.")
        except AppError as exc:
            st.error(f"Case {case.case_id} was not moved: {exc}")


@st.fragment(run_every=RETRY_POLL_S)
def _retry_progress(task: RetryTask) -> None:
    if task.finished:
        st.rerun()  # the whole page shows the outcome and the new table
    st.info(f"Sending case {task.case_id} to {task.destination} in the background; you can keep working.",
            icon=":material/cloud_upload:")


def _retry_outcome(task: RetryTask) -> None:
    outcome = task.outcome
    if task.error or outcome is None:
        st.error(f"Case {task.case_id}: {task.error or 'no outcome'}. It stays in the outbox.")
    elif outcome.delivered:
        st.success(f"Case {task.case_id} delivered: {outcome.expected} objects confirmed by the server.")
    else:
        st.warning(f"Case {task.case_id} is still queued ({outcome.confirmed}/{outcome.expected} on the "
                   f"server): {outcome.error or 'not confirmed yet'}")
