"""Command line for the clinic: analyse CT studies and forward them for teleradiology.

Exit codes:
  0  success (analyze: at least one study analysed; forward: delivered)
  2  nothing could be done (no analysable study, bad input, bad model); reason on stderr
  2  also: outbox retarget could not move a case (reason on stderr)
  3  forward / outbox flush: case(s) stay queued in the outbox for later delivery; reason on stderr
  130 interrupted (Ctrl-C; also how "outbox watch" is stopped while cases are still queued)
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from app.domain import AppError

EXIT_OK, EXIT_FAILED, EXIT_QUEUED, EXIT_INTERRUPTED = 0, 2, 3, 130

ANALYZE_EPILOG = """\
output (--json):
  {"studies": [one object per analysed study], "errors": [{"path": ..., "error": ...}]}
  study: study_instance_uid, series_instance_uid, probability (study level, mean of the
  card's top-k slice probabilities), positive (probability >= threshold), threshold,
  model {name, version, sha256, variant}, slices [{sop_instance_uid, z_mm, probability,
  interpolated: true (only on slices between the analysed ones of a thin-slice series)}],
  findings [{slice_start, slice_end (inclusive, 0-based in the sorted series), z_start_mm,
  z_end_mm, peak_slice, peak_sop_instance_uid, peak_probability, center_px [row, col],
  bbox_px [row0, col0, row1, col1] (inclusive, original pixels of the peak slice)}],
  warnings [text], timing_s {read, preprocess, inference, post, total} (stages overlap).
  A finding is a run of consecutive slices at or above the threshold, located by the
  model's class-activation heatmap; a negative study has none. The model file is checked against its card's sha256.
  A progress bar is shown on stderr when it is a terminal.

exit codes:
  0  at least one study was analysed (problems with other inputs are in "errors")
  2  no study was analysed, the model is missing/corrupt, or the --json destination cannot
     be written; one-line reason on stderr
  130 interrupted

example:
  python -m app.cli analyze /media/cdrom/DICOM study2.zip --json result.json --threads 2
"""


def _analyze(args: argparse.Namespace) -> int:
    from app.engine import analyze_cli

    return analyze_cli(args)


def _forward(args: argparse.Namespace) -> int:
    from app.forward import forward_cli

    return forward_cli(args)


def _outbox(args: argparse.Namespace) -> int:
    from app.forward import outbox_cli

    return outbox_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common_model = argparse.ArgumentParser(add_help=False)
    common_model.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                              help="registry name, model folder or .tflite file (default: the registry's default)")
    common_model.add_argument("--variant", default=None,
                              help="model variant from the card, e.g. float32 or pqat_int8 (default: the card's choice)")
    common_model.add_argument("--threads", type=int, default=None, metavar="N",
                              help="CPU threads for inference (default: number of cores, at most 4)")

    p = sub.add_parser("analyze", parents=[common_model],
                       help="analyse CT studies and write a JSON result",
                       description="Read DICOM folders, zip files or single files, pick the analysable axial CT "
                                   "series of each study, run the lytic-lesion model and write a JSON result. "
                                   "Files that cannot be used are listed under 'errors' with the reason.",
                       epilog=ANALYZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM folder, zip archive or file")
    p.add_argument("--json", required=True, metavar="OUT", help="where to write the result JSON ('-' for stdout)")
    p.add_argument("--heatmaps", metavar="DIR", default=None,
                   help="also write PNG key images (bone window + heatmap) of the most suspicious slices "
                        "and of every finding's peak slice to DIR/<SeriesInstanceUID>/slice_NNNN.png")
    p.set_defaults(handler=_analyze)

    p = sub.add_parser("forward", parents=[common_model],
                       help="analyse a study, build DICOM results, queue and deliver them to the teleradiology server",
                       description="Analyse INPUT, build the AI result SR and key images, de-identify (default), "
                                   "queue everything in the outbox and try to deliver it by DICOMweb STOW-RS. "
                                   "Exit 0 when the server confirmed the whole case, 3 when it stays queued.")
    p.add_argument("input", metavar="INPUT", help="DICOM folder, zip archive or file")
    p.add_argument("--server", default=None, metavar="URL",
                   help="DICOMweb base URL (default: $TELERAD_URL or the app settings)")
    p.add_argument("--user", default=None, help="server user (default: $TELERAD_USER); password from $TELERAD_PASSWORD")
    p.add_argument("--no-deidentify", action="store_true",
                   help="send original patient identity (only for a destination allowed to receive it)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the analysis result JSON")
    p.set_defaults(handler=_forward)

    p = sub.add_parser("outbox", help="show or deliver the store-and-forward outbox",
                       description="The outbox keeps every forwarded case until the server confirms it.")
    p.add_argument("action", choices=["status", "flush", "watch", "retarget"],
                   help="status: list cases with state, retries and last error; flush: deliver queued cases now "
                        "(exit 0 when none is left queued, 3 otherwise); watch: keep running and deliver each "
                        "queued case when its automatic retry falls due (backoff from the settings' "
                        "outbox_backoff_s, doubling up to outbox_backoff_max_s), until none is left queued "
                        "(exit 0) or Ctrl-C (exit 130); retarget: send the queued cases meant for another server "
                        "(or --case) to the configured one instead, e.g. after correcting a mistyped address "
                        "(a case whose study that server already has is removed, not sent twice); "
                        "a case queued with patient identity moves only to a server that accepts identities "
                        "(exit 2 when a case could not be moved)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="flush only the cases queued for this server; retarget: the server to send them to "
                        "(default: $TELERAD_URL or the app settings; with neither, flush sends each case to the "
                        "server it was queued for)")
    p.add_argument("--case", default=None, metavar="CASE_ID", help="retarget: only this case")
    p.add_argument("--user", default=None, help="server user (default: $TELERAD_USER)")
    p.set_defaults(handler=_outbox)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except AppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # a defect, not the user's doing: one line, the traceback only when asked for
        if args.verbose:
            traceback.print_exc()
        print("error: unexpected internal error; run again with -v for the details and report it", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
