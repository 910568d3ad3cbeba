"""The command line: the only place that parses argv, sets up logging and exits.

    dicomnode serve [--config FILE] [--aet AET] [--port N] [--bind ADDR] [--storage DIR]
    dicomnode echo HOST PORT [--aet AET] [--aec AET]
    dicomnode send PATH... --to AET@HOST:PORT [--aet AET]
    dicomnode status [--config FILE] [--storage DIR] [--json]
    dicomnode rules test PATH... [--config FILE]
    dicomnode outbox [--retry] [--destination NAME] [--json]
    dicomnode results withdraw STUDY_UID [--model NAME] --reason TEXT
    dicomnode audit verify|export [--since ...] [--until ...] [--format json|xml]
    dicomnode keys init|rotate
    dicomnode config check FILE
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomnode import __version__
from dicomnode.config import NodeConfig, load_config
from dicomnode.errors import ConfigError, DestinationError, DicomNodeError

LOG = logging.getLogger("dicomnode")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> NodeConfig:
    return load_config(getattr(args, "config", None), overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.service import Node

    overrides = {
        "ae_title": args.aet,
        "port": args.port,
        "bind_address": args.bind,
        "storage": args.storage,
    }
    config = _load(args, overrides)
    _setup_logging(config.log_level)
    node = Node(config, config_source=str(args.config or "<embedded defaults>"))

    def _on_signal(signum: int, _frame: object) -> None:
        LOG.info("received %s", signal.Signals(signum).name)
        node.request_stop()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        node.startup()
        node.run()
    finally:
        node.shutdown(timeout=config.ingest.dimse_timeout)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return EXIT_OK


def cmd_echo(args: argparse.Namespace) -> int:
    from dicomnode.export.dimse import DimseSender, Peer

    _setup_logging("WARNING")
    peer = Peer(args.aec, args.host, args.port)
    status = DimseSender(peer, args.aet, acse_timeout=args.timeout).echo()
    if status == 0:
        print(f"C-ECHO to {peer}: success")
        return EXIT_OK
    print(f"C-ECHO to {peer}: status 0x{status:04X}", file=sys.stderr)
    return EXIT_FAILURE


def cmd_send(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dicomnode.export.dimse import DimseSender, Peer, iter_paths, scan

    _setup_logging("WARNING")
    peer = Peer.parse(args.to)
    try:
        paths = list(iter_paths(args.paths))
    except FileNotFoundError as exc:
        print(f"error: no such file or folder: {exc}", file=sys.stderr)
        return EXIT_USAGE
    files, skipped = scan(paths)
    for path, why in skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if not files:
        print("error: nothing to send", file=sys.stderr)
        return EXIT_FAILURE
    bar = tqdm(total=len(files), unit="inst", disable=args.quiet or None, desc=f"to {peer}")
    report = DimseSender(peer, args.aet).send(files, progress=lambda f, code: bar.update(1))
    bar.close()
    for path, why in report.failed:
        print(f"failed {path}: {why}", file=sys.stderr)
    print(f"sent {report.sent} of {len(files)} instances to {peer}; {len(report.failed)} failed")
    return EXIT_OK if not report.failed else EXIT_FAILURE


def _ts(value: float | None) -> str:
    return datetime.fromtimestamp(value).isoformat(timespec="seconds") if value else "-"


def cmd_status(args: argparse.Namespace) -> int:
    from dicomnode.core.index import Index

    config = _load(args, {"storage": args.storage})
    db = Index.path_for(config.storage)
    if not db.exists():
        print(f"error: no index at {db} (has the node run with this storage folder?)",
              file=sys.stderr)
        return EXIT_FAILURE
    index = Index(db)
    try:
        studies = index.summary()
    finally:
        index.close()
    jobs = _jobs(config.storage)
    if args.json:
        print(json.dumps({"storage": str(config.storage), "studies": studies, "jobs": jobs},
                         indent=2))
        return EXIT_OK
    if not studies:
        print("no studies")
        return EXIT_OK
    for s in studies:
        print(
            f"study {s['study_uid']}  {s['state']}  revision {s['revision']}  "
            f"{s['instances']} instances  from {s['calling_ae']}  "
            f"last {_ts(s['last_received'])}  completed {_ts(s['completed_at'])}"
        )
        for se in s["series"]:
            print(f"  series {se['series_uid']}  {se['instances']} instances  {se['bytes']} bytes")
    for j in jobs:
        print(f"job {j['id']}  {j['state']}  {j['model']}  {j['priority']}  attempts {j['attempts']}"
              f"  series {j['series_uid']}" + (f"  error: {j['last_error']}" if j["last_error"]
                                               and j["state"] != "done" else ""))
    return EXIT_OK


def _jobs(storage: Path) -> list[dict[str, Any]]:
    from dicomnode.queue.sqlite import SQLiteJobQueue

    path = SQLiteJobQueue.path_for(storage)
    if not path.exists():
        return []
    queue = SQLiteJobQueue(path)
    try:
        return [
            {
                "id": j.id,
                "key": j.key,
                "model": j.model,
                "state": j.state.value,
                "priority": j.priority.name.lower(),
                "attempts": j.attempts,
                "study_uid": j.payload.get("study_uid"),
                "series_uid": j.payload.get("series_uid"),
                "last_error": j.last_error,
                "result": j.result,
            }
            for j in queue.list()
        ]
    finally:
        queue.close()


def cmd_rules_test(args: argparse.Namespace) -> int:
    from dicomnode.export.dimse import iter_paths
    from dicomnode.routing.rules import evaluate, explain, series_from_files

    config = _load(args)
    try:
        paths = list(iter_paths(args.paths))
    except FileNotFoundError as exc:
        print(f"error: no such file or folder: {exc}", file=sys.stderr)
        return EXIT_USAGE
    series, skipped = series_from_files(paths)
    for path, why in skipped:
        if args.verbose:
            print(f"skipped {path}: {why}", file=sys.stderr)
    if not series:
        print("error: no DICOM series found", file=sys.stderr)
        return EXIT_FAILURE
    by_study: dict[str, list[Any]] = {}
    for s in series:
        by_study.setdefault(s.study_uid, []).append(s)
    for study_uid, study_series in by_study.items():
        print(f"study {study_uid}: {len(study_series)} series")
        print(explain(evaluate(config.routing, study_series)))
    return EXIT_OK


def cmd_outbox(args: argparse.Namespace) -> int:
    from dicomnode.core.layout import StorageLayout
    from dicomnode.export.outbox import Outbox

    config = _load(args, {"storage": args.storage})
    if not StorageLayout(config.storage).outbox.exists():
        print(f"no outbox in {config.storage} (nothing was ever queued for delivery)")
        return EXIT_OK
    outbox = Outbox(config.storage)
    try:
        if args.retry:
            changed = outbox.retry(destination=args.destination)
            print(f"{changed} failed deliver{'y' if changed == 1 else 'ies'} made due again; a"
                  " running node sends them within its idle wait")
        states = None if args.all else ["pending", "failed"]
        deliveries = outbox.list(states, destination=args.destination)
        summary = outbox.summary()
    finally:
        outbox.close()
    if args.json:
        print(json.dumps({
            "summary": {d: {s.value: n for s, n in c.items()} for d, c in summary.items()},
            "deliveries": [d.as_dict() for d in deliveries],
        }, indent=2, default=str))
        return EXIT_OK
    for dest, counts in sorted(summary.items()):
        print(f"{dest}: " + ", ".join(f"{n} {s.value}" for s, n in counts.items()))
    for d in deliveries:
        item = d.as_dict()
        line = f"  #{item['id']} {item['destination']} {item['state']} {item['sop_instance_uid']}"
        if item.get("attempts"):
            line += f" attempts {item['attempts']}"
        if item.get("last_error") and item["state"] != "sent":
            line += f"  last error: {item['last_error']}"
        print(line)
    if not summary:
        print("outbox is empty")
    return EXIT_OK


def cmd_results_withdraw(args: argparse.Namespace) -> int:
    """Withdraw a study's results by hand: a rejection note (IHE IOCM) to every destination
    that received them (dicomnode.withdrawal)."""
    from dicomnode.audit.setup import open_audit
    from dicomnode.core.index import Index
    from dicomnode.core.layout import StorageLayout
    from dicomnode.encode.kos import REJECTION_TITLES
    from dicomnode.export.outbox import Outbox
    from dicomnode.withdrawal import RejectionGate, WithdrawalError, withdraw

    config = _load(args, {"storage": args.storage})
    _setup_logging("WARNING")
    db = Index.path_for(config.storage)
    if not db.exists():
        print(f"error: no index at {db} (has the node run with this storage folder?)",
              file=sys.stderr)
        return EXIT_FAILURE
    if not StorageLayout(config.storage).outbox.exists():
        index = Index(db)
        try:
            known = index.query("SELECT 1 FROM studies WHERE study_uid = ?", (args.study_uid,))
        finally:
            index.close()
        why = ("its results were never sent to any destination" if known
               else "unknown study: the node holds nothing of it")
        print(f"error: study {args.study_uid}: {why}; nothing changed", file=sys.stderr)
        return EXIT_FAILURE
    index = Index(db)
    outbox = Outbox(config.storage)
    gate = RejectionGate(config.storage)
    audit = None
    try:
        try:
            audit = open_audit(config, "cli")
        except Exception as exc:
            print(f"warning: cannot record this in the audit trail: {exc}", file=sys.stderr)
        try:
            report = withdraw(storage=config.storage, outbox=outbox, index=index, gate=gate,
                              study_uid=args.study_uid, reason=args.reason, model=args.model,
                              title=REJECTION_TITLES[args.title], user=_user(), audit=audit)
        except WithdrawalError as exc:
            print(f"error: {exc}; nothing changed", file=sys.stderr)
            return EXIT_FAILURE
    finally:
        close = getattr(audit, "close", None)
        if close is not None:
            close()
        gate.close()
        outbox.close()
        index.close()
    for d in report.destinations:
        line = f"{d.destination}: "
        line += (f"rejection note {d.note_uid} for {len(d.rejected)} result(s), queued"
                 if d.note_uid else "received none of them, no note")
        if d.dropped:
            line += f"; {d.dropped} unsent deliver{'y' if d.dropped == 1 else 'ies'} dropped"
        print(line)
    print(f"{len(report.withdrawn)} result(s) of study {report.study_uid} withdrawn; a running"
          " node sends the notes within its idle wait")
    return EXIT_OK


def _cli_audit(config: NodeConfig, build_name: str, *args: Any, **kwargs: Any) -> None:
    """Record a command's own audit event in the 'cli' chain (best effort)."""
    from dicomnode.audit import events
    from dicomnode.audit.setup import open_audit

    try:
        audit = open_audit(config, "cli")
    except Exception as exc:
        print(f"warning: cannot record this in the audit trail: {exc}", file=sys.stderr)
        return
    audit.record(getattr(events, build_name), *args, **kwargs)
    close = getattr(audit, "close", None)
    if close is not None:
        close()


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from dicomnode.audit.setup import chains
    from dicomnode.audit.verify import verify

    config = _load(args, {"storage": args.storage})
    public = args.public_keys or config.keys_folder
    folders = chains(config)
    if not folders:
        print(f"no audit trail at {config.audit_folder}")
        return EXIT_FAILURE
    ok = True
    for folder in folders:
        report = verify(folder, public)
        print(f"[{folder.name}] {report.summary()}")
        ok = ok and report.ok
    if not args.no_record:
        _cli_audit(config, "audit_log_used", "verify", _user(), 0 if ok else 4)
    return EXIT_OK if ok else EXIT_FAILURE


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _when(text: str | None) -> datetime | None:
    if text is None:
        return None

    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def cmd_audit_export(args: argparse.Namespace) -> int:
    from dicomnode.audit.codec import from_dict, to_xml
    from dicomnode.audit.setup import chains, open_keyring
    from dicomnode.audit.verify import read

    config = _load(args, {"storage": args.storage})
    keyring = open_keyring(config, create=False)
    since, until = _when(args.since), _when(args.until)
    records = []
    for folder in chains(config):
        for seq, at, body in read(folder, keyring, since, until):
            records.append((at, folder.name, seq, body))
    records.sort(key=lambda r: (r[0], r[1], r[2]))
    if args.format == "json":
        print(json.dumps([{"chain": c, "seq": q, "time": t.isoformat(), "event": b}
                          for t, c, q, b in records], indent=1, default=str))
    else:
        print('<?xml version="1.0" encoding="UTF-8"?>')
        print("<AuditMessages>")
        for _t, _c, _q, body in records:
            xml = to_xml(from_dict(body))
            print(xml.split("?>", 1)[-1].strip() if xml.startswith("<?xml") else xml)
        print("</AuditMessages>")
    _cli_audit(config, "audit_log_used", "export", _user(), 0,
               description=f"{len(records)} records, {args.format}")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from dicomnode.audit.keys import Keyring

    config = _load(args, {"storage": args.storage})
    folder = config.keys_folder
    if args.keys_command == "init":
        if folder.exists() and any(folder.iterdir()):
            print(f"error: {folder} already holds keys; use 'dicomnode keys rotate'",
                  file=sys.stderr)
            return EXIT_FAILURE
        keyring = Keyring.init(folder)
        print(f"created audit keys in {folder} (data key {keyring.current_key_id}); give"
              f" auditors the public key(s) there (*.pub.pem), keep the folder backed up")
        return EXIT_OK
    keyring = Keyring.load(folder)
    key_id = keyring.rotate(signing=args.signing)
    print(f"new data key {key_id} is current; earlier records stay readable")
    _cli_audit(config, "keys_rotated", key_id, user=_user())
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print(f"{args.file}: OK (AE {config.ae_title} on {config.bind_address}:{config.port}, "
          f"storage {config.storage})")
    if config.open_to_any_caller:
        print(f"warning: accept_any_caller: any calling AE title reachable through"
              f" {config.bind_address}:{config.port} may store instances", file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicomnode", description="A DICOM AI node for hospitals.")
    p.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the node")
    s.add_argument("--config", type=Path, help="service config file (YAML)")
    s.add_argument("--aet", help="AE title of the node")
    s.add_argument("--port", type=int, help="DIMSE port")
    s.add_argument("--bind", help="address to listen on")
    s.add_argument("--storage", type=Path, help="storage folder")
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    e.add_argument("host")
    e.add_argument("port", type=int)
    e.add_argument("--aet", default="DICOMNODE", help="our calling AE title")
    e.add_argument("--aec", default="ANY-SCP", help="the peer's AE title")
    e.add_argument("--timeout", type=float, default=10)
    e.set_defaults(func=cmd_echo)

    se = sub.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    se.add_argument("paths", nargs="+", metavar="PATH")
    se.add_argument("--to", required=True, metavar="AET@HOST:PORT")
    se.add_argument("--aet", default="DICOMNODE", help="our calling AE title")
    se.add_argument("--quiet", action="store_true", help="no progress bar")
    se.set_defaults(func=cmd_send)

    st = sub.add_parser("status", help="studies, series and their states")
    st.add_argument("--config", type=Path)
    st.add_argument("--storage", type=Path)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status)

    r = sub.add_parser("rules", help="routing rule tools")
    rsub = r.add_subparsers(dest="rules_command", required=True)
    rt = rsub.add_parser("test", help="which rule matches which series of a folder, and why not")
    rt.add_argument("paths", nargs="+", metavar="PATH")
    rt.add_argument("--config", type=Path)
    rt.add_argument("--verbose", action="store_true", help="list files that were skipped")
    rt.set_defaults(func=cmd_rules_test)

    o = sub.add_parser("outbox", help="pending and failed deliveries of results; retry them")
    o.add_argument("--config", type=Path)
    o.add_argument("--storage", type=Path)
    o.add_argument("--destination", help="only this destination")
    o.add_argument("--retry", action="store_true", help="make failed deliveries due again")
    o.add_argument("--all", action="store_true", help="list sent deliveries too")
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=cmd_outbox)

    rs = sub.add_parser("results", help="the node's results")
    rsub = rs.add_subparsers(dest="results_command", required=True)
    rw = rsub.add_parser("withdraw", help="withdraw a study's results: a rejection note"
                         " (IHE IOCM) to every destination that received them")
    rw.add_argument("study_uid", metavar="STUDY_UID")
    rw.add_argument("--model", help="only the results of this model")
    rw.add_argument("--reason", required=True, help="why (written into the rejection note"
                    " and the audit trail; no patient identifiers)")
    rw.add_argument("--title", default="quality",
                    choices=["quality", "patient-safety", "incorrect-worklist",
                             "retention-expired"],
                    help="rejection note title (PS3.16 CID 7011); default: quality")
    rw.add_argument("--config", type=Path)
    rw.add_argument("--storage", type=Path)
    rw.set_defaults(func=cmd_results_withdraw)

    a = sub.add_parser("audit", help="the encrypted, tamper-evident audit trail")
    asub = a.add_subparsers(dest="audit_command", required=True)
    av = asub.add_parser("verify", help="check every record's integrity (no decryption)")
    av.add_argument("--config", type=Path)
    av.add_argument("--storage", type=Path)
    av.add_argument("--public-keys", type=Path, help="a *.pub.pem file or folder (default:"
                    " the key folder)")
    av.add_argument("--no-record", action="store_true", help="do not audit this verification")
    av.set_defaults(func=cmd_audit_verify)
    ae = asub.add_parser("export", help="decrypt records (needs the data keys)")
    ae.add_argument("--config", type=Path)
    ae.add_argument("--storage", type=Path)
    ae.add_argument("--since", help="ISO date/time (UTC unless given)")
    ae.add_argument("--until", help="ISO date/time (UTC unless given)")
    ae.add_argument("--format", choices=["json", "xml"], default="json")
    ae.set_defaults(func=cmd_audit_export)

    k = sub.add_parser("keys", help="audit keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    for name, text in (("init", "create the key folder"), ("rotate", "start a new data key")):
        kp = ksub.add_parser(name, help=text)
        kp.add_argument("--config", type=Path)
        kp.add_argument("--storage", type=Path)
        if name == "rotate":
            kp.add_argument("--signing", action="store_true", help="also a new signing key")
        kp.set_defaults(func=cmd_keys)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", help="validate a config file without starting")
    cc.add_argument("file", type=Path)
    cc.set_defaults(func=cmd_config_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DestinationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except DicomNodeError as exc:  # e.g. an audit key file with unsafe permissions
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
