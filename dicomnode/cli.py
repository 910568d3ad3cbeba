"""The command line: the only place that parses argv, sets up logging and exits.

    dicomnode serve [--config FILE] [--aet AET] [--port N] [--bind ADDR] [--storage DIR]
    dicomnode worker --config FILE [--storage DIR]
    dicomnode echo HOST PORT [--aet AET] [--aec AET]
    dicomnode send PATH... --to AET@HOST:PORT [--aet AET]
    dicomnode demo [--to AET@HOST:PORT] [--config FILE]
    dicomnode status [--config FILE] [--storage DIR] [--json]
    dicomnode rules test PATH... [--config FILE]
    dicomnode outbox [--retry] [--destination NAME] [--json]
    dicomnode results withdraw STUDY_UID [--model NAME] --reason TEXT
    dicomnode audit verify|export [--since ...] [--until ...] [--format json|xml]
    dicomnode keys init|rotate
    dicomnode config check FILE
    dicomnode config show [--config FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from dicomnode import __version__
from dicomnode.cli_common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from dicomnode.cli_common import load as _load
from dicomnode.cli_common import setup_logging as _setup_logging
from dicomnode.cli_ops import (
    cmd_audit_export,
    cmd_audit_verify,
    cmd_keys,
    cmd_outbox,
    cmd_results_withdraw,
)
from dicomnode.config import NodeConfig, load_config
from dicomnode.errors import ConfigError, DestinationError, DicomNodeError

LOG = logging.getLogger("dicomnode")



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


def cmd_worker(args: argparse.Namespace) -> int:
    """Run models for a node (queue.backend celery), perhaps on another machine."""
    from dicomnode.worker.remote import RemoteWorker, TokenRefused

    config = _load(args)
    _setup_logging(config.log_level)
    logging.getLogger("celery").setLevel(logging.WARNING)
    logging.getLogger("kombu").setLevel(logging.WARNING)
    storage = args.storage or Path("dicomnode-worker")
    worker = RemoteWorker(config, storage)
    try:
        return worker.run()
    except TokenRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        worker.close()


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

    from dicomnode.export.dimse import DicomFile, DimseSender, Peer, iter_paths, scan

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

    def progress(file: DicomFile, status: int) -> None:
        bar.update(1)

    report = DimseSender(peer, args.aet).send(files, progress=progress)
    bar.close()
    for path, why in report.failed:
        print(f"failed {path}: {why}", file=sys.stderr)
    print(f"sent {report.sent} of {len(files)} instances to {peer}; {len(report.failed)} failed")
    return EXIT_OK if not report.failed else EXIT_FAILURE


def cmd_demo(args: argparse.Namespace) -> int:
    from dicomnode.demo import http_root, own_address, run_demo
    from dicomnode.export.dimse import Peer
    from dicomnode.web.viewer import study_link

    _setup_logging("WARNING")
    config = _load(args)
    peer = Peer.parse(args.to) if args.to else own_address(config)
    print(f"making a synthetic chest CT (no patient data) and sending it to {peer} ...")
    result = run_demo(peer, calling_ae=args.aet)
    print(f"sent {result.sent} of {result.instances} instances of study {result.study_uid} "
          f"(made in {result.seconds_to_make:.1f} s, sent in {result.seconds_to_send:.1f} s)")
    if result.failed:
        print(f"{len(result.failed)} failed, e.g. {result.failed[0][1]}", file=sys.stderr)
        return EXIT_FAILURE
    root = http_root(config)
    if root and not args.to:
        print("when the node has routed and processed it (about a minute):")
        print(f"  status page: {root}/")
        print(f"  in OHIF:     {root}{study_link(result.study_uid)}")
    return EXIT_OK


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
    from dicomnode.worker.nodeside import status_lines, status_report  # issue 12

    queues = status_report(config)
    if args.json:
        print(json.dumps({"storage": str(config.storage), "studies": studies, "jobs": jobs,
                          "queues": queues}, indent=2))
        return EXIT_OK
    for line in status_lines(queues):
        print(line)
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


def cmd_config_check(args: argparse.Namespace) -> int:
    from dicomnode.core.tls import check_key_file

    config = load_config(args.file)
    problems: list[tuple[str, str]] = []
    for setting, path in _private_keys(config):  # those on this machine, as the node will
        if path is not None and Path(path).exists():
            try:
                check_key_file(path, setting)
            except ConfigError as exc:
                problems.extend(exc.problems)
    if problems:
        raise ConfigError(str(args.file), problems)
    print(f"{args.file}: OK (AE {config.ae_title} on {config.bind_address}:{config.port}, "
          f"storage {config.storage})")
    if config.open_to_any_caller:
        print(f"warning: accept_any_caller: any calling AE title reachable through"
              f" {config.bind_address}:{config.port} may store instances", file=sys.stderr)
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    """The effective configuration: the file's values over the embedded defaults."""
    import yaml

    config = load_config(args.config)
    source = str(args.config) if args.config else "the embedded defaults (no config file)"
    print(f"# effective configuration of dicomnode {__version__}, from {source}")
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return EXIT_OK


def _private_keys(config: NodeConfig) -> list[tuple[str, str | Path | None]]:
    """Every private key file the config names, with its setting."""
    keys: list[tuple[str, str | Path | None]] = [("http.keyfile", config.http.keyfile)]
    if config.ingest.tls is not None:
        keys.append(("ingest.tls.keyfile", config.ingest.tls.keyfile))
    for i, dest in enumerate(config.destinations):
        if dest.tls is not None:
            keys.append((f"destinations.{i}.tls.keyfile", dest.tls.keyfile))
    fc = config.audit.forward
    if fc is not None:
        keys.append(("audit.forward.keyfile", fc.keyfile) if fc.keyfile is not None
                    else ("audit.forward.certfile", fc.certfile))
    return keys


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

    w = sub.add_parser("worker", help="run models for a node (queue.backend celery), from"
                       " this or another machine")
    w.add_argument("--config", type=Path, required=True,
                   help="config with queue.url, worker.node_url and worker.token")
    w.add_argument("--storage", type=Path, help="this worker's own folder (default"
                   " ./dicomnode-worker)")
    w.set_defaults(func=cmd_worker)

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

    de = sub.add_parser("demo", help="send a synthetic chest CT (no patient data) to a node")
    de.add_argument("--to", metavar="AET@HOST:PORT",
                    help="default: this node's own address (from --config or the defaults)")
    de.add_argument("--config", type=Path, help="the node's config file, for its address")
    de.add_argument("--aet", default="DEMO", help="our calling AE title")
    de.set_defaults(func=cmd_demo)

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
    cs = csub.add_parser("show", help="print the effective configuration (defaults included)")
    cs.add_argument("--config", type=Path, help="service config file (YAML); none: the defaults")
    cs.set_defaults(func=cmd_config_show)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.umask(0o077)  # whatever the node or a command writes is owner-only (patient data)
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
