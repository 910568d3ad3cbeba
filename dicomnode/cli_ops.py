"""The operator's record-keeping commands: the outbox, withdrawing results (IHE IOCM),
the audit trail and its keys. Wired into argv by :mod:`dicomnode.cli`."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from dicomnode.cli_common import EXIT_FAILURE, EXIT_OK, load, setup_logging
from dicomnode.config import NodeConfig


def cmd_outbox(args: argparse.Namespace) -> int:
    from dicomnode.core.layout import StorageLayout
    from dicomnode.export.outbox import Outbox

    config = load(args, {"storage": args.storage})
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

    config = load(args, {"storage": args.storage})
    setup_logging("WARNING")
    db = Index.path_for(config.storage)
    if not db.exists():
        print(f"error: no index at {db} (has the node run with this storage folder?)",
              file=sys.stderr)
        return EXIT_FAILURE
    if not StorageLayout(config.storage).outbox.exists():
        index = Index(db)
        try:
            known = index.last_received(args.study_uid) is not None
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

    config = load(args, {"storage": args.storage})
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

    config = load(args, {"storage": args.storage})
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

    config = load(args, {"storage": args.storage})
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
