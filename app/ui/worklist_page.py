"""Worklist page (teleradiologist): the forwarded cases on the server, most urgent first.

Everything comes from ``app.worklist`` (QIDO-RS listing, AI result read from the AI SR, read
status). While the page is open it asks the server every ``REFRESH_S`` seconds whether cases or
reads arrived, and refreshes itself when they did.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import streamlit as st

from app.dicomweb import DicomWebClient
from app.domain import AppError
from app.ui.state import friendly_errors
from app.ui.telerad import (
    CASE_KEY,
    CASE_PAGE,
    case_name,
    fetch_entries,
    local_time,
    reader_identity,
    reader_panel,
    reader_settings,
    sr_cache,
    waited,
)
from app.worklist import (
    ReadStatus,
    WorklistEntry,
    filter_worklist,
    new_arrivals,
    sort_worklist,
)

REFRESH_S = 30
STATUS_KEY, CLINIC_KEY, OPEN_KEY = "worklist_status", "worklist_clinics", "worklist_open"
KNOWN_KEY = "worklist_known"  # (study UIDs, SR UIDs) the table shows


def worklist_rows(entries: list[WorklistEntry], now: datetime) -> pd.DataFrame:
    """The worklist as a table, in the order given (no patient identity: the server holds none)."""
    rows = []
    for rank, e in enumerate(entries, start=1):
        read = e.latest_read
        rows.append({
            "#": rank,
            "AI probability": f"{e.ai.probability:.1%}" if e.ai else "-",
            "AI triage": e.ai.triage_label if e.ai else "AI result not received yet",
            "Clinic": e.clinic,
            "Arrived": local_time(e.arrived_at),
            "Waiting": waited(e.waiting_s(now)) if e.arrived_at and e.status == ReadStatus.UNREAD else "-",
            "Status": str(e.status) + (f" ({read.urgency}, {read.agreement}s with AI)" if read else ""),
            "Case": e.case_ref,
            "Images": e.n_instances,
        })
    return pd.DataFrame(rows)


def case_label(entry: WorklistEntry) -> str:
    ai = f"p={entry.ai.probability:.2f} {'suspicious' if entry.ai.positive else 'not suspicious'}" if entry.ai \
        else "no AI result"
    return f"{case_name(entry)} - {ai} - {entry.status}"


def render() -> None:
    st.title("Worklist")
    st.caption("Forwarded cases on the teleradiology server, unread and AI-suspicious first, then the longest "
               "waiting. Arrived: when the clinic released the case.")
    with friendly_errors():
        _page()


def _page() -> None:
    reader_panel()
    settings = reader_settings()
    if not settings.url:
        st.warning("No teleradiology server is configured for the reader: set TELERAD_READER_URL (or the "
                   "clinic's server on the Settings page).")
        return
    with DicomWebClient(settings) as client:
        entries = fetch_entries(client)
    previous = st.session_state.get(KNOWN_KEY)
    arrived = new_arrivals(entries, previous[0]) if previous else []
    st.session_state[KNOWN_KEY] = ({e.study_uid for e in entries}, _sr_uids())
    if arrived:
        st.info(f"{len(arrived)} new case(s) arrived since the last refresh.", icon=":material/notifications:")

    now = datetime.now(UTC)
    clinics = sorted({e.clinic for e in entries})
    left, right, button = st.columns([2, 3, 1], vertical_alignment="bottom")
    statuses = left.multiselect("Status", [str(s) for s in ReadStatus], default=[str(ReadStatus.UNREAD)],
                                key=STATUS_KEY)
    chosen = right.multiselect("Clinic", clinics, key=CLINIC_KEY, placeholder="All clinics")
    button.button("Refresh", key="worklist_refresh", icon=":material/refresh:")
    shown = filter_worklist(sort_worklist(entries, now), [ReadStatus(s) for s in statuses], chosen)

    unread = [e for e in entries if e.status == ReadStatus.UNREAD]
    st.markdown(f"**{len(unread)} unread** ({sum(e.ai is not None and e.ai.positive for e in unread)} AI-suspicious)"
                f" of {len(entries)} case(s) on the server; {len(shown)} shown.")
    if not shown:
        st.info("No case matches the filters." if entries else "No case on the server yet.")
    else:
        st.dataframe(worklist_rows(shown, now), hide_index=True, width="stretch")
        by_uid = {e.study_uid: e for e in shown}
        study = st.selectbox("Case", list(by_uid), format_func=lambda uid: case_label(by_uid[uid]), key=OPEN_KEY)
        if st.button("Open case", key="open_case", type="primary", icon=":material/image_search:"):
            _open(study)
    _watch(settings)


def _sr_uids() -> frozenset[str]:
    return frozenset(sr_cache())


def _open(study_uid: str) -> None:
    if not reader_identity()[0]:
        st.warning("Enter your name under 'Reader and connection' first: case views and reads are signed.")
        return
    st.session_state[CASE_KEY] = study_uid
    st.switch_page(CASE_PAGE)


@st.fragment(run_every=REFRESH_S)
def _watch(settings) -> None:
    """Every REFRESH_S seconds: refresh the whole page when a case or an SR (AI result, read) arrived."""
    known = st.session_state.get(KNOWN_KEY)
    if not known:
        return
    try:
        with DicomWebClient(settings) as client:
            studies = {(s.get("0020000D", {}).get("Value") or [""])[0] for s in client.search_studies()}
            srs = {(i.get("00080018", {}).get("Value") or [""])[0]
                   for i in client.search_all_instances(Modality="SR")}
    except AppError:  # a failed background check waits for the next one
        st.caption("Last automatic check failed; it will try again.")
        return
    if studies != known[0] or not srs <= known[1]:
        st.rerun()
