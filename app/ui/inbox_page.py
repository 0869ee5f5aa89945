"""Inbox page (clinic): the radiologists' reads of the cases this clinic forwarded.

Reads are fetched on demand ("Check for reads now") and every ``REFRESH_S`` seconds while the
page is open (``app.inbox.fetch_reads``), matched to the local patient through the
de-identification mapping, and listed urgent first, then new, then newest. New reads are
highlighted until someone acknowledges them; receiving and acknowledging go to the audit log.
"""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from app.audit import Action, open_audit_log
from app.dicomweb import DicomWebClient
from app.domain import AppError
from app.forward import open_outbox, open_pseudonyms
from app.inbox import FetchReport, InboxRead, fetch_reads, open_inbox
from app.ui.state import friendly_errors, server_settings
from app.ui.telerad import CLINIC_USER_KEY, clinic_user, local_time

REFRESH_S = 60
LAST_CHECK_KEY = "inbox_last_check"
NEW_STYLE = "background-color: #fff3c4; font-weight: 600"
URGENT_STYLE = "background-color: #fde0dc; font-weight: 600"


def inbox_rows(reads: list[InboxRead]) -> pd.DataFrame:
    """The inbox as a table, in the order given, against the clinic's own patient and study."""
    return pd.DataFrame([{
        "Flag": " ".join(flag for flag, on in (("URGENT", r.report.urgent), ("NEW", r.is_new)) if on) or "-",
        "Patient ID": r.original_patient_id,
        "Verified": local_time(r.report.verified_at),
        "Radiologist": r.report.radiologist.replace("^", " "),
        "AI": f"radiologist {r.report.agreement}s",
        "Lytic lesion": "present" if r.report.lesion_present else "absent",
        "Lesions marked": len(r.report.lesions),
        "Impression": r.report.impression.splitlines()[0] if r.report.impression else "",
        "Sent as": r.ai_summary,
        "Study": r.original_study_uid,
    } for r in reads])


def _style(table: pd.DataFrame):
    def row_style(row: pd.Series) -> list[str]:
        style = URGENT_STYLE if "URGENT" in row["Flag"] else NEW_STYLE if "NEW" in row["Flag"] else ""
        return [style] * len(row)

    return table.style.apply(row_style, axis=1)


def render() -> None:
    st.title("Inbox")
    st.caption("Radiologists' reads of the cases this clinic forwarded, matched to your patients. "
               "Urgent reads are on top; new ones are highlighted until acknowledged.")
    with friendly_errors():
        _page()


def _fetch(actor: str) -> FetchReport:
    """Fetch new reads; whatever the outcome, the automatic check waits its interval before the next try."""
    settings = server_settings().require_url()
    audit = open_audit_log()

    def received(read: InboxRead) -> None:  # recorded as each read is stored, also if a later case fails
        audit.append(actor, Action.READ_RECEIVED, read.report.study_uid, read.report.sop_instance_uid,
                     f"{read.report.urgency}")

    try:
        with DicomWebClient(settings) as client, open_outbox() as outbox, open_pseudonyms() as pseudonyms, \
                open_inbox() as inbox:
            return fetch_reads(client, outbox, pseudonyms, inbox, on_new_read=received)
    finally:  # an unreachable server must not be waited for again on every click
        st.session_state[LAST_CHECK_KEY] = time.time()


def _page() -> None:
    clinic_user()
    st.text_input("Your name (for the audit log)", key=CLINIC_USER_KEY, persist_state="session")
    if not server_settings().url:
        st.warning("No teleradiology server is configured; set it on the Settings page.")
        return
    if st.button("Check for reads now", key="inbox_check", type="primary", icon=":material/refresh:"):
        try:
            with st.spinner("Checking the server for reads…"):
                report = _fetch(clinic_user() or "clinic")
        except AppError as exc:  # the server is out of reach: the reads already here are still shown below
            st.error(f"Could not check for new reads: {exc}")
        else:
            _show_fetch(report)
    with open_inbox() as inbox:
        reads = inbox.reads()
    if not reads:
        st.info("No read has come back yet.")
    else:
        new = [r for r in reads if r.is_new]
        st.markdown(f"{len(reads)} read(s): **{len(new)} new**, {sum(r.report.urgent for r in reads)} urgent.")
        st.dataframe(_style(inbox_rows(reads)), hide_index=True, width="stretch")
        for read in new:
            _details(read)
    _timer()  # last: the reads already here show before an automatic check waits on the network


def _show_fetch(report: FetchReport) -> None:
    st.success(f"Checked {report.cases_checked} case(s): {len(report.new_reads)} new read(s).")
    if report.unmatched:
        st.warning(f"{report.unmatched} read(s) belong to studies the de-identification mapping does not "
                   "know; they are not shown.")
    if report.unretrieved:
        st.warning(f"{report.unretrieved} report(s) listed by the server could not be downloaded; "
                   "they are tried again at the next check.")


def _details(read: InboxRead) -> None:
    r = read.report
    title = f"{'URGENT - ' if r.urgent else ''}Patient {read.original_patient_id}: read by " \
            f"{r.radiologist.replace('^', ' ')} on {local_time(r.verified_at)}"
    with st.expander(title, expanded=r.urgent):
        st.markdown(f"**Impression**  \n{r.impression}")
        st.markdown(f"The radiologist **{r.agreement}s** with the AI ({read.ai_summary}); lytic lesion "
                    f"**{'present' if r.lesion_present else 'absent'}**, {len(r.lesions)} location(s) marked. "
                    f"Organisation: {r.organization}. Study {read.original_study_uid}.")
        if st.button("Acknowledge", key=f"seen_{r.sop_instance_uid}"):
            who = clinic_user()
            if not who:
                st.warning("Enter your name first: acknowledging is recorded in the audit log.")
                return
            with open_inbox() as inbox:
                inbox.mark_seen(r.sop_instance_uid, who)
            open_audit_log().append(who, Action.READ_SEEN, r.study_uid, r.sop_instance_uid)
            st.rerun()


@st.fragment(run_every=REFRESH_S)
def _timer() -> None:
    """While the page is open: fetch reads every REFRESH_S seconds; refresh the page when new ones came."""
    last = st.session_state.get(LAST_CHECK_KEY)
    if last is not None and time.time() - last < REFRESH_S / 2:  # just checked (button or first run)
        st.caption(f"Last checked {time.strftime('%H:%M:%S', time.localtime(last))}; checks every {REFRESH_S} s.")
        return
    try:
        report = _fetch(clinic_user() or "clinic")
    except AppError as exc:
        st.caption(f"Automatic check failed ({exc}); it will try again.")
        return
    st.caption(f"Last checked {time.strftime('%H:%M:%S')}; checks every {REFRESH_S} s.")
    if report.new_reads:  # the list above was drawn before they came
        st.rerun()
