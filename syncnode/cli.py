"""The ``syncnode`` command line: parse, call, print. Every reading command has ``--json``.

The operations themselves live in :mod:`syncnode.service`, shared with the admin API.
Exit codes, the same for every command:

====  =====================================================================================
0     done
1     the command ran but found problems or nothing matched: files rejected by import,
      damage found by verify, no live instance / no trusted or discovered peer with that id
2     it could not run as given: wrong usage, a malformed id, UID or URL, a bad setting,
      no node in the folder, a peer presenting another certificate than the id names
====  =====================================================================================
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from . import __version__
from .ids import InvalidUID
from .local import LocalNode, NodeNotInitialised
from .safetext import clean
from .service import Conflict, NodeService, NotFound, ServiceError, UsageError

app = typer.Typer(
    help="syncnode: keep DICOM studies identical across sites, peer to peer, verified.",
    no_args_is_help=True, add_completion=False, rich_markup_mode=None,
)
ca_app = typer.Typer(help="Cluster certificate authority (optional).", no_args_is_help=True)
app.add_typer(ca_app, name="ca")


class CleanConsole(Console):
    """A console that escapes control characters in the strings it prints (text from
    peers, PACS, file names), keeping line breaks: nothing printed can drive the
    terminal."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(clean(o, multiline=True) if isinstance(o, str) else o
                        for o in objects), **kwargs)


err = CleanConsole(stderr=True, soft_wrap=True)  # never break a path in an error over lines
out = CleanConsole(highlight=False, soft_wrap=True, markup=False)  # paths may contain [...]

def _announce_default_data(ctx: typer.Context, param: typer.CallbackParam, value: Path
                           ) -> Path:
    """Say on stderr which folder is used when neither --data nor SYNCNODE_DATA chose one:
    a command run from another directory must not silently find (or make) no node."""
    source = ctx.get_parameter_source(param.name or "data")
    if not ctx.resilient_parsing and getattr(source, "name", "") == "DEFAULT":
        err.print(f"note: using the data folder {value.absolute()} (the default "
                  f"./{value}; choose one with --data DIR or SYNCNODE_DATA)", markup=False,
                  highlight=False)
    return value


DataOpt = Annotated[Path, typer.Option(
    "--data", "-d", envvar="SYNCNODE_DATA",
    help="Node data folder (env SYNCNODE_DATA); without either, ./syncnode-data, announced "
         "on stderr.", show_default=True, callback=_announce_default_data)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
DEFAULT_DATA = Path("syncnode-data")


EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
_EXIT = {UsageError: EXIT_USAGE, NotFound: EXIT_PROBLEMS, Conflict: EXIT_USAGE}


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    import logging

    from .logs import configured

    if configured():
        # `run` has set up its log format: a supervisor reading stderr as JSON lines
        # gets this as one record too.
        logging.getLogger("syncnode").critical("%s", message)
    else:
        err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def refused(exc: ServiceError) -> NoReturn:
    """Print a refused operation and exit with its code from the table above."""
    fail(str(exc), _EXIT.get(type(exc), EXIT_USAGE))


def open_node(data: Path, *, identity: bool = True) -> LocalNode:
    """Open the node, checking its identity (key matches certificate) unless the command
    never uses it (``identity=False``: no X.509 library loaded, a faster start)."""
    try:
        node = LocalNode(data)
    except NodeNotInitialised as exc:
        fail(str(exc))
    if identity:
        from .tls.errors import IdentityError

        try:
            node.identity  # noqa: B018 (loads and checks it)
        except IdentityError as exc:
            node.close()
            fail(str(exc))
    return node


def open_service(data: Path, *, identity: bool = True) -> NodeService:
    return NodeService(open_node(data, identity=identity))


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def version_callback(value: bool) -> None:
    if value:
        out.print(f"syncnode {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=version_callback,
                                               is_eager=True, help="Print the version.")]
         = False) -> None:
    """syncnode: keep DICOM studies identical across sites, peer to peer, verified."""


@app.command()
def init(data: DataOpt = DEFAULT_DATA,
         ca: Annotated[Path | None, typer.Option(
             help="Folder of a cluster CA (from `syncnode ca init`) to sign this node's "
                  "certificate: nodes signed by one CA trust each other.")] = None,
         csr: Annotated[Path | None, typer.Option(
             help="Instead of a certificate, write a signing request to this file for the "
                  "cluster CA to sign on its own machine; finish with `syncnode cert "
                  "install`.")] = None,
         json_out: JsonOpt = False) -> None:
    """Create a node: data folder, key and certificate, config file, API keys. Prints the
    node id and the two admin API keys (read-only and admin): they are shown only now,
    only their hashes are kept; `syncnode apikey rotate` makes new ones.

    Example: syncnode init --data /srv/syncnode
    """
    from .tls.errors import IdentityError
    from .tls.identity import load_ca

    if csr is not None:
        from .tls.issuance import make_request

        if (data / "node.crt").exists():
            fail(f"{data} already holds a node; renew it with `syncnode cert csr`")
        try:
            csr.write_bytes(make_request(data))
        except (OSError, IdentityError) as exc:
            fail(str(exc))
        out.print(f"Wrote the signing request {csr} (the key stays in {data}).")
        out.print(f"On the CA's machine: syncnode ca sign {csr.name} --out node.crt")
        out.print(f"Then here: syncnode cert install node.crt --ca-cert ca.crt --data {data}")
        return
    try:
        authority = load_ca(ca) if ca else None
        node = LocalNode.init(data, ca=authority)
    except IdentityError as exc:
        fail(str(exc))
    _created(node, data, json_out)


def _created(node: LocalNode, data: Path, json_out: bool) -> None:
    if json_out:
        print_json({"node_id": str(node.node_id), "data": str(data.resolve()),
                    "api_keys": node.new_api_keys})
    else:
        out.print(f"Created node in {data}")
        out.print(f"Node id: {node.node_id}")
        out.print("Give this id to the operators of the peers that should trust this node.")
        for role, key in node.new_api_keys.items():
            out.print(f"Admin API {role} key: {key}")
        if node.new_api_keys:
            out.print("Keep the API keys now: only their hashes are stored "
                      "(`syncnode apikey rotate` makes new ones).")
        out.print("DICOM: the SCP accepts any calling AE title until you list the allowed "
                  "ones, e.g. in the config file:")
        out.print(f'  echo \'allowed_aes = ["MODALITY1", "PACS@10.0.0.5"]\' >> '
                  f'{shlex.quote(str(data / "config.toml"))}', markup=False, highlight=False)
        out.print("  (or SYNCNODE_ALLOWED_AES='[\"MODALITY1\"]'; AE@HOST also requires that "
                  "address)", markup=False, highlight=False)


@ca_app.command("sign")
def ca_sign(csr: Annotated[Path, typer.Argument(help="The node's signing request "
                                                     "(from `syncnode cert csr`).")],
            out_file: Annotated[Path, typer.Option("--out", help="Where to write the node's "
                                                   "certificate (PEM).")],
            ca: Annotated[Path, typer.Option("--ca", help="Folder of the CA (ca.key, ca.crt).")]
            = Path("ca")) -> None:
    """Issue a node certificate from a CSR, on the machine that holds ca.key (which never
    leaves it). The node installs it with `syncnode cert install CERT --ca-cert ca.crt`.

    Example: syncnode ca sign site-b.csr --ca /secure/ca --out site-b.crt
    """
    from .nodeid import NodeId
    from .tls.certificates import der_to_pem
    from .tls.errors import NodeTLSError
    from .tls.identity import load_ca
    from .tls.issuance import sign_request

    try:
        authority = load_ca(ca)
        der = sign_request(authority, csr.read_bytes())
        out_file.write_bytes(der_to_pem(der))
    except OSError as exc:
        fail(f"{exc.filename or csr}: {exc.strerror or exc}")
    except NodeTLSError as exc:
        fail(str(exc))
    out.print(f"Issued {out_file} for node {NodeId.from_certificate_der(der)}")
    out.print(f"On the node: syncnode cert install {out_file.name} --ca-cert "
              f"{authority.cert_path.name}")


@ca_app.command("revoke")
def ca_revoke(what: Annotated[str, typer.Argument(metavar="CERT_OR_ID", help="The node's "
                                                  "certificate file or its node id.")],
              ca: Annotated[Path, typer.Option("--ca", help="Folder of the CA.")]
              = Path("ca")) -> None:
    """Revoke a node certificate this CA issued: rewrites CA/crl.pem. Copy that file into
    every node's data folder (or where its crl_file setting points); running nodes re-read
    it at their next handshake, no restart needed.

    Example: syncnode ca revoke P56IOI7-MZJNU2Y-... --ca /secure/ca
    """
    from .tls.errors import NodeTLSError
    from .tls.identity import load_ca
    from .tls.issuance import revoke

    try:
        node, crl = revoke(load_ca(ca), what)
    except NodeTLSError as exc:
        fail(str(exc))
    out.print(f"Revoked {node}; revocation list: {crl}")
    out.print("Copy it to every node's data folder as crl.pem (or its crl_file setting).")


@ca_app.command("init")
def ca_init(folder: Annotated[Path, typer.Argument(help="Folder for ca.key and ca.crt.")]
            ) -> None:
    """Create a cluster CA. Keep ca.key offline; give ca.crt to every node (init --ca)."""
    from .tls.errors import IdentityError
    from .tls.identity import create_ca

    try:
        authority = create_ca(folder)
    except IdentityError as exc:
        fail(str(exc))
    out.print(f"Created cluster CA in {folder} ({authority.cert_path.name})")


@app.command("id")
def node_id(data: DataOpt = DEFAULT_DATA, json_out: JsonOpt = False) -> None:
    """Print this node's id (the SHA-256 of its certificate, grouped for reading aloud)."""
    node = open_node(data)
    if json_out:
        print_json({"node_id": str(node.node_id)})
    else:
        out.print(str(node.node_id))


@app.command("import")
def import_cmd(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive).")],
    data: DataOpt = DEFAULT_DATA, json_out: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Ingest DICOM Part-10 files into the node.

    Re-importing the same bytes adds nothing. Files that are not DICOM, are truncated or
    lack required UIDs are listed with the reason; the rest are imported, and the exit
    code is 1 if any file failed.

    Example: syncnode import --data /srv/syncnode /media/cdrom/DICOM
    """
    from .importer import iter_files

    service = open_service(data)  # the key signs the put events: checked first
    for p in paths:
        if not p.exists():
            fail(f"{p}: no such file or folder")
    files = list(iter_files(paths))
    total = sum(f.stat().st_size for f in files)
    show = not (quiet or json_out) and err.is_terminal
    columns = (TextColumn("importing"), BarColumn(), MofNCompleteColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, disable=not show) as progress:
        files_task = progress.add_task("import", total=len(files))

        def step(_path: Path, _nbytes: int) -> None:
            progress.update(files_task, advance=1)

        report = service.import_paths(files, progress=step)
    audit_write(data, "import", "failure" if report.failed and not report.imported
                and not report.unchanged else "success", files=report.files,
                instances=report.imported, unchanged=report.unchanged,
                failed=len(report.failed), bytes=report.bytes, studies=report.studies)
    if json_out:
        print_json(report.to_dict())
    else:
        out.print(f"{report.files} files: {report.imported} imported, "
                  f"{report.unchanged} already present, {len(report.failed)} failed "
                  f"({human_bytes(report.bytes)} of {human_bytes(total)} accepted)")
        for path, reason in report.failed:
            out.print(f"  FAILED {path}: {reason}")
    if report.failed:
        raise typer.Exit(EXIT_PROBLEMS)


@app.command("ls")
def ls(data: DataOpt = DEFAULT_DATA,
       study: Annotated[str | None, typer.Option(help="Only this Study Instance UID.")] = None,
       series: Annotated[str | None, typer.Option(help="Only this Series Instance UID.")]
       = None,
       json_out: JsonOpt = False) -> None:
    """List live instances (one line each), optionally of one study or series."""
    try:
        rows = open_service(data).instances(study=study, series=series)
    except ServiceError as exc:
        refused(exc)
    if json_out:
        print_json([r.to_dict() for r in rows])
        return
    for r in rows:
        out.print(f"{r.study_instance_uid}  {r.series_instance_uid}  {r.sop_instance_uid}  "
                  f"{r.modality or '-':4} {r.study_date or '-':8}  {r.size:>10}  {r.blob[:16]}")


@app.command("rm")
def rm(sop_uids: Annotated[list[str] | None, typer.Argument(
           help="SOP Instance UIDs to delete.")] = None,
       data: DataOpt = DEFAULT_DATA,
       study: Annotated[str | None, typer.Option(help="Delete every instance of this study.")]
       = None,
       reason: Annotated[str | None, typer.Option(
           help="What the rejection notes sent to the export PACS say: quality (113001), "
                "safety (113037), worklist (113038) or retention (113039). Default: the "
                "destination's export_reject_reason (quality).")] = None,
       json_out: JsonOpt = False) -> None:
    """Delete instances: writes a tombstone that syncs to every peer; frees the blobs; the
    export PACS that received them are sent a rejection note."""
    if not sop_uids and not study:
        fail("give SOP Instance UIDs or --study UID")
    service = open_service(data)
    try:
        studies = {study} if study else {i.study_instance_uid for i in map(
            service.node.catalog.instance, sop_uids or []) if i is not None}
        result = service.delete(sop_uids or [], study=study, reason=reason)
    except NotFound as exc:
        if json_out:
            print_json({"tombstones": [], "freed_blobs": []})
        else:
            out.print("0 tombstones written, 0 blobs freed")
        refused(exc)
    except ServiceError as exc:
        refused(exc)
    except InvalidUID as exc:  # named by the audit's look-up before the service checked it
        fail(str(exc))
    audit_write(data, "deleted", instances=len(result.inserted), studies=studies,
                sops=None if study else sop_uids)
    if json_out:
        print_json({"tombstones": result.inserted, "freed_blobs": sorted(result.freed_blobs)})
    else:
        out.print(f"{len(result.inserted)} tombstones written, "
                  f"{len(result.freed_blobs)} blobs freed")


@app.command()
def status(data: DataOpt = DEFAULT_DATA, json_out: JsonOpt = False) -> None:
    """Counts, bytes, the Merkle root (equal roots = same catalog)."""
    st = open_service(data).status()
    if json_out:
        print_json(st)
        return
    for line in status_lines(st):
        out.print(line)


SPARK = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 30) -> str:
    """The last ``width`` values as block characters, scaled to their maximum."""
    values = values[-width:]
    top = max(values, default=0)
    if top <= 0:
        return SPARK[1] * len(values)
    return "".join(SPARK[max(1, round(v / top * (len(SPARK) - 1)))] if v > 0 else SPARK[1]
                   for v in values)


def human_age(t: float) -> str:
    import time as _time

    if not t:
        return "never"
    s = max(0.0, _time.time() - t)
    return (f"{s:.0f} s ago" if s < 90 else f"{s / 60:.0f} min ago" if s < 5400
            else f"{s / 3600:.1f} h ago" if s < 172_800 else f"{s / 86400:.1f} days ago")


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return (f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
            if seconds < 5400 else f"{seconds / 3600:.1f} h")


def status_lines(st: dict[str, Any]) -> list[str]:
    """`syncnode status` as text: what the dashboard shows, line by line (pure)."""
    lines = [f"node        {st['node_id']}",
             f"instances   {st['instances']} in {st['studies']} studies, {st['series']} series"
             f" ({human_bytes(st['instance_bytes'])})",
             f"blobs       {st['blobs']} ({human_bytes(st['blob_bytes'])})",
             f"events      {st['events']} ({st['put_events']} put, "
             f"{st['delete_events']} delete)",
             f"merkle root {st['merkle_root']}"]
    caps = st.get("bandwidth", {})
    lines.append(f"bandwidth   in {caps.get('in', 'unlimited')}, out "
                 f"{caps.get('out', 'unlimited')} (caps in force now; syncnode limit show)")
    for d in st.get("discovered", []):
        lines.append(f"discovered  {d['node_id']}  {d['url']}  (not trusted: "
                     f"syncnode peer accept {d['node_id'][:15]}...)")
    for p in st["peers"]:
        line = f"peer        {p['node_id'][:15]}  {p['url']}  {p.get('state', 'never contacted')}"
        prog = p.get("progress")
        if prog:
            done = prog["fraction_done"]
            bar = "#" * round(done * 20)
            line += (f"  [{bar:<20}] {prog['instances_needed']} of "
                     f"{prog['instances_total']} instances, "
                     f"{human_bytes(prog['bytes_needed'])} of "
                     f"{human_bytes(prog['bytes_total'])} still needed")
            if prog.get("eta_seconds") is not None:
                line += (f", {human_bytes(prog['rate'])}/s, about "
                         f"{human_duration(prog['eta_seconds'])} left")
        elif p.get("in_sync") and p.get("peer_lacks"):
            line += f"  (it still lacks {p['peer_lacks']} events of ours)"
        got, sent = p.get("bytes_received", 0), p.get("bytes_sent", 0)
        wire_got = p.get("wire_bytes_received", 0)
        if got or sent:
            line += f"  received {human_bytes(got)}"
            if 0 < wire_got < got:  # zstd on the wire (of the pulled bytes)
                line += f" ({wire_got / got:.0%} of it on the wire)"
            line += f", sent {human_bytes(sent)}"
        cap = p.get("cap") or {}
        if any(v != "unlimited" for v in cap.values()):
            line += f"  cap in {cap.get('in')}, out {cap.get('out')}"
        if p.get("last_success"):
            line += f"  last success {human_age(p['last_success'])}"
        if p.get("last_error"):
            line += f"  last error: {p['last_error']}"
        lines.append(line)
        tp = p.get("throughput") or {}
        if any(tp.get("in") or []) or any(tp.get("out") or []):
            span = len(tp.get("in") or []) * tp.get("interval", 2.0)
            lines.append(f"  in  {sparkline(tp.get('in') or [])}  "
                         f"(last {human_duration(span)}, peak "
                         f"{human_bytes(max(tp.get('in') or [0]))}/s)")
            lines.append(f"  out {sparkline(tp.get('out') or [])}  "
                         f"(peak {human_bytes(max(tp.get('out') or [0]))}/s)")
        for study, (instances, nbytes) in (p.get("studies_needed") or {}).items():
            lines.append(f"  study {study}: {instances} instances, {human_bytes(nbytes)} "
                         "to go")
    for a in st.get("arrivals", [])[:10]:
        at = ", ".join(f"{peer[:7]} {human_age(t)}" for peer, t in a["at_peers"].items())
        lines.append(f"arrived     {a['study_instance_uid']}  {a['instances']} instances  "
                     + (f"arriving ({a['instances_needed']} more to come)"
                        if a.get("instances_needed") else f"here {human_age(a['arrived'])}")
                     + (f"; at peers: {at}" if at else ""))
    dicom = st.get("dicom")
    if dicom:
        lines.append(f"dicom scp   {dicom['ae_title']} port {dicom['port']}"
                     f"{' (TLS)' if dicom.get('tls') else ''}: "
                     f"{dicom.get('associations', 0)} associations "
                     f"({dicom['rejected_associations']} rejected), {dicom['stored']} stored, "
                     f"{dicom['duplicates']} duplicates, {dicom['failed']} failed, "
                     f"{dicom['finds']} C-FIND")
        for source, imp in (dicom.get("import_from") or {}).items():
            line = (f"import from {source}  {imp.get('state', '?')}: "
                    f"{imp.get('studies_retrieved', 0)} studies, "
                    f"{imp.get('instances_retrieved', 0)} instances retrieved, "
                    f"{imp.get('runs', 0)} polls ({imp.get('errors', 0)} failed), last "
                    f"{human_age(imp.get('last_run', 0.0))}")
            if imp.get("last_error"):
                line += f"\n  ERROR {imp['last_error']}"
            lines.append(line)
    for dest, ex in st.get("export", {}).items():
        line = (f"export      {dest}  {ex['pending']} pending, {ex['done']} done, "
                f"{ex['failed']} failed, {ex['skipped']} skipped")
        notes = ex.get("rejection_notes") or {}
        if any(notes.values()):
            line += (f"; rejection notes {notes.get('pending', 0)} pending, "
                     f"{notes.get('done', 0)} sent, {notes.get('failed', 0)} failed, "
                     f"{notes.get('skipped', 0)} skipped")
        if ex.get("last_error"):
            line += f"  last error: {ex['last_error']}"
        lines.append(line)
        for item in ex.get("failed_items", [])[:10]:
            lines.append(f"  FAILED {item['sop_instance_uid']}: {item['reason']}")
    v = st.get("verify")
    sched = st.get("verify_schedule") or {}
    if v:
        lines.append(f"verify      last {human_age(v.get('finished', 0))} ({v.get('source')}): "
                     f"{v.get('blobs_checked', 0)} blobs, "
                     f"{human_bytes(v.get('bytes_checked', 0))} checked, "
                     + ("OK" if v.get("ok") else f"{v.get('problems', 0)} PROBLEMS "
                        "(syncnode verify --repair mends them from peers)"))
        for d in (v.get("damaged") or [])[:10]:
            lines.append(f"  DAMAGED {d['blob']}: {d['reason']}")
        for h in (v.get("missing") or [])[:10]:
            lines.append(f"  MISSING {h}")
    else:
        lines.append("verify      never run (syncnode verify, or verify_interval = \"7d\")")
    if sched.get("interval"):
        lines.append(f"            background verify every "
                     f"{human_duration(sched['interval'])} at most {sched['rate_mb']:g} MB/s"
                     + ("; running now" if sched.get("running") else ""))
    return lines


@app.command()
def verify(data: DataOpt = DEFAULT_DATA, json_out: JsonOpt = False,
           repair: Annotated[bool, typer.Option(
               help="Fetch damaged or missing blobs from trusted peers.")] = False) -> None:
    """Re-hash every blob and chunk list. Exit 1 and list the damage if any.

    With --repair, damaged blobs are moved to <data>/damaged/ and fetched again from
    trusted peers (verified like any transfer); exit 0 if everything was mended."""
    import time as _time

    from .scrub import VerifyResult, record

    node = open_node(data)
    show = not json_out and err.is_terminal
    started = _time.time()
    with Progress(TextColumn("verifying"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=err, disable=not show) as progress:
        task = progress.add_task("verify", total=node.catalog.counts()["blob_bytes"] or None)
        report = node.verify(lambda _h, n: progress.update(task, advance=n))
    repaired: dict[str, str] = {}
    if repair and (report.damaged or report.missing):
        import asyncio

        from .repair import repair_blobs

        wanted = [d.hash for d in report.damaged] + report.missing
        repaired = asyncio.run(repair_blobs(node, wanted))
        fixed = {b for b, how in repaired.items() if how.startswith("repaired")}
        report.damaged = [d for d in report.damaged if d.hash not in fixed]
        report.missing = [h for h in report.missing if h not in fixed]
    try:  # the last verify, for `status` and the dashboard
        record(data, VerifyResult(
            started=started, finished=_time.time(), source="cli",
            blobs_checked=report.blobs_checked, bytes_checked=report.bytes_checked,
            damaged=[{"blob": d.hash, "reason": d.reason} for d in report.damaged][:50],
            missing=report.missing[:50], problems=len(report.damaged) + len(report.missing)
            + len(report.catalog_problems)))
    except OSError as exc:
        err.print(f"warning: the result could not be recorded for `status`: {exc}")
    if json_out:
        print_json({"ok": report.ok, "blobs_checked": report.blobs_checked,
                    "repair": repaired,
                    "bytes_checked": report.bytes_checked,
                    "damaged": [{"blob": d.hash, "reason": d.reason} for d in report.damaged],
                    "missing": report.missing, "catalog_problems": report.catalog_problems,
                    "transfer_files": report.transfer_files,
                    "transfer_bytes": report.transfer_bytes})
    else:
        out.print(f"checked {report.blobs_checked} blobs ({human_bytes(report.bytes_checked)})")
        for d in report.damaged:
            out.print(f"  DAMAGED {d.hash}: {d.reason}")
        for h in report.missing:
            out.print(f"  MISSING {h}: referenced by the catalog, not in the store")
        for p in report.catalog_problems:
            out.print(f"  CATALOG {p}")
        for b, how in repaired.items():
            out.print(f"  REPAIR {b}: {how}")
        if report.transfer_files:
            out.print(f"  unfinished transfers in tmp/: {report.transfer_files} files "
                      f"({human_bytes(report.transfer_bytes)}); `syncnode gc` removes "
                      "abandoned ones")
        out.print("OK" if report.ok else "PROBLEMS FOUND")
    if not report.ok:
        raise typer.Exit(EXIT_PROBLEMS)


cert_app = typer.Typer(help="This node's certificate: renew it, or have the cluster CA "
                            "sign it.", no_args_is_help=True)
app.add_typer(cert_app, name="cert")


@cert_app.command("renew")
def cert_renew(data: DataOpt = DEFAULT_DATA,
               grace_days: Annotated[float | None, typer.Option(
                   help="Days the old certificate stays accepted by peers (default: the "
                        "cert_grace_days setting, 30).")] = None,
               json_out: JsonOpt = False) -> None:
    """Give this node a new key and certificate (self-signed). The old key signs a
    statement naming the new one; peers that trust this node check it and trust the new
    certificate by themselves at their next contact. The node id changes (it is the
    certificate's SHA-256); events signed before keep verifying. Stop `run` first.

    Example: syncnode cert renew --data /srv/syncnode
    """
    from .renewal import RenewalError, renew
    from .tls.errors import NodeTLSError

    node = open_node(data)
    grace = grace_days if grace_days is not None else node.settings().cert_grace_days
    try:
        done = renew(node, grace)
    except (RenewalError, NodeTLSError) as exc:
        fail(str(exc))
    _renewed(data, done, json_out)


def _renewed(data: Path, done: Any, json_out: bool) -> None:
    import time

    audit_write(data, "trust-add", subject=done.new.compact,
                reason=f"certificate renewed from {done.old.compact}")
    if json_out:
        print_json(done.to_dict())
        return
    out.print(f"Renewed: node id {done.old} is now {done.new}")
    out.print(f"Peers that trust the old id learn the new one at their next contact; the old "
              f"certificate is accepted until "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(done.grace_until))}.")


@cert_app.command("csr")
def cert_csr(out_file: Annotated[Path, typer.Option("--out", help="Where to write the "
                                                    "signing request (PEM).")],
             data: DataOpt = DEFAULT_DATA) -> None:
    """Make a key (kept in the data folder as pending.key) and a certificate signing
    request for it, for the cluster CA to sign elsewhere (`syncnode ca sign`). Works on a
    new, empty data folder (then `cert install` creates the node) or on a node (then
    `cert install` renews it).

    Example: syncnode cert csr --data /srv/syncnode --out site-b.csr
    """
    from .tls.errors import NodeTLSError
    from .tls.issuance import make_request

    try:
        out_file.write_bytes(make_request(data))
    except NodeTLSError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.filename or out_file}: {exc.strerror or exc}")
    out.print(f"Wrote {out_file}. On the CA's machine: syncnode ca sign {out_file.name} "
              f"--out node.crt; then here: syncnode cert install node.crt --ca-cert ca.crt")


@cert_app.command("install")
def cert_install(cert: Annotated[Path, typer.Argument(help="The certificate the CA issued "
                                                      "for this node's pending.key.")],
                 data: DataOpt = DEFAULT_DATA,
                 ca_cert: Annotated[Path | None, typer.Option(
                     "--ca-cert", help="The cluster CA's certificate (ca.crt): this node "
                                       "then trusts every node the CA signed.")] = None,
                 grace_days: Annotated[float | None, typer.Option(
                     help="When renewing: days the old certificate stays accepted.")] = None,
                 json_out: JsonOpt = False) -> None:
    """Install a certificate signed from `cert csr`: creates the node in a new data folder,
    or renews an existing node (like `cert renew`, with the CA's certificate).

    Example: syncnode cert install site-b.crt --ca-cert ca.crt --data /srv/syncnode
    """
    from cryptography.exceptions import InvalidSignature

    from .renewal import RenewalError, renew
    from .tls.certificates import coerce_der, der_to_pem, is_ca, parse_der
    from .tls.errors import NodeTLSError
    from .tls.identity import CA_CERT_FILE, load_identity
    from .tls.issuance import PENDING_KEY_FILE, matching_key

    try:
        der = coerce_der(cert.read_bytes())
        key = matching_key(data, der)
        if key is None:
            fail(f"{cert} is not for this node's {data / PENDING_KEY_FILE} (make the request "
                 f"with `syncnode cert csr --data {data}` and have that one signed)")
        ca_der = None
        if ca_cert is not None:
            ca_der = coerce_der(ca_cert.read_bytes())
            ca_parsed = parse_der(ca_der, str(ca_cert))
            if not is_ca(ca_parsed):
                fail(f"{ca_cert} is not a CA certificate")
            parse_der(der, str(cert)).verify_directly_issued_by(ca_parsed)
    except OSError as exc:
        fail(f"{exc.filename or cert}: {exc.strerror or exc}")
    except NodeTLSError as exc:
        fail(str(exc))
    except (InvalidSignature, TypeError, ValueError) as exc:
        fail(f"{cert} was not issued by {ca_cert} ({type(exc).__name__})")
    if ca_der is not None:
        from .durable import atomic_write

        atomic_write(data / CA_CERT_FILE, der_to_pem(ca_der), 0o644)
    if (data / "node.crt").exists():
        node = open_node(data)
        grace = grace_days if grace_days is not None else node.settings().cert_grace_days
        try:
            done = renew(node, grace, cert_der=der, key_path=key)
        except (RenewalError, NodeTLSError) as exc:
            fail(str(exc))
        _renewed(data, done, json_out)
        return
    from .durable import atomic_write

    atomic_write(data / "node.crt", der_to_pem(der), 0o644)
    key.rename(data / "node.key")
    try:
        load_identity(data)
        node = LocalNode.init(data, adopt_identity=True)
    except NodeTLSError as exc:
        fail(str(exc))
    _created(node, data, json_out)


peer_app = typer.Typer(help="Manage the trusted peers.", no_args_is_help=True)
app.add_typer(peer_app, name="peer")


@peer_app.command("add")
def peer_add(
    node_id_arg: Annotated[str, typer.Argument(metavar="NODE_ID", help="The peer's node id.")],
    url: Annotated[str, typer.Argument(help="Its peer address, https://HOST:PORT.")],
    data: DataOpt = DEFAULT_DATA,
    push: Annotated[str, typer.Option(
        help="auto: also push when the peer does not dial us; always; never.")] = "auto",
    cert: Annotated[Path | None, typer.Option(
        "--cert", help="The peer's certificate file (its node.crt): pin it from the file "
                       "instead of fetching it from URL, e.g. when this node cannot reach "
                       "the peer.")] = None,
) -> None:
    """Trust a peer and sync with it. Its certificate is fetched from URL (or read from
    --cert) and pinned only if its SHA-256 is NODE_ID (if it is offline now, on first
    contact). URL is https://HOST:PORT (or HOST:PORT); http:// is refused: peers speak only
    mutual TLS."""
    import asyncio

    service = open_service(data)
    try:
        der = cert.read_bytes() if cert is not None else None
    except OSError as exc:
        fail(f"cannot read {cert}: {exc.strerror or exc}")
    try:
        added = asyncio.run(service.add_peer(node_id_arg, url, push, certificate=der))
    except ServiceError as exc:
        refused(exc)
    audit_write(data, "trust-add", subject=added.node_id.compact, url=added.url[:300])
    if added.note:
        err.print(f"warning: {added.note}; its certificate will be pinned on first contact")
    out.print(f"Trusted peer {added.node_id} at {added.url}"
              + ("" if added.pinned else " (not contacted yet)"))


@peer_app.command("list")
def peer_list(data: DataOpt = DEFAULT_DATA, json_out: JsonOpt = False) -> None:
    """List peers with their sync state and why they are trusted: pin, id (pinned on first
    contact), ca (admitted by the cluster CA: seen dialling us or as the origin of events we
    hold), denied (removed, or revoked by the CA). A renewed peer shows the id it renewed
    from."""
    rows = open_service(data).peers()
    if json_out:
        print_json(rows)
        return
    for r in rows:
        out.print(f"{r['node_id']}  {r['url'] or '-'}  {r.get('trusted_by', '')}  "
                  f"{r.get('state', 'never contacted')}"
                  + (f"  renewed from {r['renewed_from']}" if r.get("renewed_from") else "")
                  + (f"  last error: {r['last_error']}" if r.get("last_error") else ""))


@peer_app.command("accept")
def peer_accept(node_id_arg: Annotated[str, typer.Argument(metavar="NODE_ID")],
                data: DataOpt = DEFAULT_DATA) -> None:
    """Trust a node that `syncnode run --discovery` saw on the LAN (see `status`). Its
    certificate is fetched from the announced address and pinned only if it matches."""
    import asyncio

    service = open_service(data)
    try:
        added = asyncio.run(service.accept_peer(node_id_arg))
    except ServiceError as exc:
        refused(exc)
    audit_write(data, "trust-accept", subject=added.node_id.compact, url=added.url[:300])
    out.print(f"Trusted peer {added.node_id} at {added.url}")


@peer_app.command("remove")
def peer_remove(node_id_arg: Annotated[str, typer.Argument(metavar="NODE_ID")],
                data: DataOpt = DEFAULT_DATA) -> None:
    """Stop trusting a peer: its connections are refused from the next request on. With a
    cluster CA the id also goes on the deny list (refused at the TLS handshake although the
    CA signed it); `peer add` lifts that."""
    try:
        peer = open_service(data).remove_peer(node_id_arg)
    except ServiceError as exc:
        refused(exc)
    audit_write(data, "trust-remove", subject=peer.compact)
    out.print(f"Removed peer {peer}")


apikey_app = typer.Typer(help="The admin API keys: a read-only one and an admin one.",
                         no_args_is_help=True)
app.add_typer(apikey_app, name="apikey")


@apikey_app.command("show")
def apikey_show(data: DataOpt = DEFAULT_DATA, json_out: JsonOpt = False) -> None:
    """Which keys exist (role, fingerprint, creation time). The keys themselves cannot be
    shown: only their hashes are stored."""
    from .apikeys import ApiKeyError, KeyStore

    open_node(data, identity=False).close()
    try:
        keys = KeyStore(data).info()
    except ApiKeyError as exc:
        fail(str(exc))
    if json_out:
        print_json([k.to_dict() for k in keys])
        return
    import time as _time

    for k in keys:
        when = _time.strftime("%Y-%m-%d %H:%M:%S UTC", _time.gmtime(k.created))
        out.print(f"{k.role:6} fingerprint {k.fingerprint}  created {when}")
    if not keys:
        out.print("no API keys: `syncnode apikey rotate read` / `... rotate admin` create them")


@apikey_app.command("rotate")
def apikey_rotate(role: Annotated[str, typer.Argument(help="read or admin.")],
                  data: DataOpt = DEFAULT_DATA, json_out: JsonOpt = False) -> None:
    """Make a new key for ROLE and print it (the only time it is shown). The previous key
    of that role, and the dashboard sessions opened with it, stop working at once, also in
    a running node.

    Example: syncnode apikey rotate --data /srv/syncnode read
    """
    from .apikeys import ROLES, ApiKeyError, KeyStore, adopt_config_key

    if role not in ROLES:
        fail(f"the role is {' or '.join(ROLES)}, not {role!r}")
    open_node(data, identity=False).close()
    try:
        adopt_config_key(data)  # an older node's clear key must not outlive a rotation
        key = KeyStore(data).rotate(role)
    except ApiKeyError as exc:
        fail(str(exc))
    if json_out:
        print_json({"role": role, "key": key})
    else:
        out.print(key)


viewer_app = typer.Typer(help="The web viewer (OHIF) served at /viewer/ by `syncnode run`.",
                         no_args_is_help=True)
app.add_typer(viewer_app, name="viewer")


def _viewer_folder(data: Path, folder: Path | None) -> Path:
    if folder is not None:
        return folder
    from .config import ConfigError
    from .viewer import folder_of

    node = open_node(data, identity=False)
    try:
        return folder_of(node.data, node.settings().viewer_dir)
    except ConfigError as exc:
        fail(str(exc))
    finally:
        node.close()


ViewerDirOpt = Annotated[Path | None, typer.Option(
    "--dir", help="Install into / read this folder instead of the node's viewer_dir "
                  "(default DATA/viewer).")]


@viewer_app.command("install")
def viewer_install(
        source: Annotated[Path | None, typer.Option(
            "--from", help="An npm tarball of @ohif/app (ohif-app-X.Y.Z.tgz), its unpacked "
                           "folder, or a built dist/ folder. Default: `npm pack` the pinned "
                           "version (needs npm and the npm registry).")] = None,
        folder: ViewerDirOpt = None, force: Annotated[bool, typer.Option(
            "--force", help="Install again even if the pinned version is there.")] = False,
        data: DataOpt = DEFAULT_DATA, json_out: JsonOpt = False) -> None:
    """Install the pinned OHIF viewer for /viewer/: unpack, check, swap in atomically.
    A running node serves the new files at once.

    Example: syncnode viewer install --data /srv/syncnode
    """
    import time as _time

    from .viewer import PACKAGE, PINNED_VERSION, ViewerError, current, install

    target = _viewer_folder(data, folder)
    started = _time.monotonic()
    info = current(target) if source is None and not force else None
    fresh = info is None
    if info is None:
        if not json_out:
            what = f"{PACKAGE}@{PINNED_VERSION}" if source is None else str(source)
            out.print(f"installing {what} into {target} ...")
        try:
            info = install(target, source)
        except ViewerError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"cannot write the viewer into {target}: {exc}")
    elapsed = _time.monotonic() - started
    if json_out:
        print_json({**info.to_dict(), "installed_now": fresh, "seconds": round(elapsed, 2)})
        return
    what = "installed" if fresh else "already installed"
    out.print(f"{info.package}@{info.version} {what} in {info.path}: {info.files} files, "
              f"{human_bytes(info.bytes)} ({elapsed:.1f} s). `syncnode run` serves it at "
              f"/viewer/ of the admin API.")


@viewer_app.command("status")
def viewer_status(folder: ViewerDirOpt = None, data: DataOpt = DEFAULT_DATA,
                  json_out: JsonOpt = False) -> None:
    """Which viewer is installed (exit 1 if none, or damaged)."""
    from .viewer import ViewerNotInstalled, installed

    target = _viewer_folder(data, folder)
    try:
        info = installed(target)
    except ViewerNotInstalled as exc:
        fail(str(exc), EXIT_PROBLEMS)
    if json_out:
        print_json(info.to_dict())
    else:
        out.print(f"{info.package}@{info.version} in {info.path}: {info.files} files, "
                  f"{human_bytes(info.bytes)}")


config_app = typer.Typer(help="Read and change the node's settings (config.toml).",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(data: DataOpt = DEFAULT_DATA, json_out: JsonOpt = False) -> None:
    """The effective settings (file, environment, defaults; the API key masked)."""
    from .config import ConfigError

    try:
        shown = open_service(data, identity=False).config()
    except ConfigError as exc:
        fail(str(exc))
    if json_out:
        print_json(shown)
        return
    for key, value in sorted(shown["config"].items()):
        later = "  (takes effect at restart)" if key in shown["restart_keys"] else ""
        out.print(f"{key} = {json.dumps(value)}{later}")


@config_app.command("set")
def config_set(key: Annotated[str, typer.Argument(help="Setting name, e.g. sync_interval.")],
               value: Annotated[str, typer.Argument(
                   help="A TOML value: 2.5, true, \"text\", [\"A@h:104\"]; bare text is "
                        "taken as a string.")],
               data: DataOpt = DEFAULT_DATA) -> None:
    """Change one setting in config.toml (validated first; the same check as PATCH
    /api/v1/config). A running node picks up keys that need no restart through the API
    only; here the change is written for its next start.

    Example: syncnode config set --data /srv/syncnode sync_interval 2.5
    """
    import tomllib

    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    try:
        result = open_service(data, identity=False).patch_config({key: parsed})
    except ServiceError as exc:
        refused(exc)
    audit_write(data, "config-changed", subject=key, count=1)
    out.print(f"{key} = {json.dumps(parsed)}"
              + ("  (takes effect at restart)" if result["restart_required"] else ""))


limit_app = typer.Typer(help="Bandwidth caps of blob bytes, per peer and overall, in and "
                             "out, with time-of-day schedules.", no_args_is_help=True)
app.add_typer(limit_app, name="limit")
ScopeArg = Annotated[str, typer.Argument(
    help="in, out (all peers together), NODEID:in or NODEID:out (one peer).")]


@limit_app.command("show")
def limit_show(data: DataOpt = DEFAULT_DATA, json_out: JsonOpt = False) -> None:
    """The caps as configured and the rate in force now for each scope."""
    from .config import ConfigError

    try:
        shown = open_service(data, identity=False).limits()
    except ConfigError as exc:
        fail(str(exc))
    if json_out:
        print_json(shown)
        return
    for scope, rate in shown["in_force"].items():
        schedule = shown["caps"].get(scope)
        out.print(f"{scope:<60} {rate:<12} {schedule or ''}", markup=False, highlight=False)


@limit_app.command("set")
def limit_set(scope: ScopeArg,
              schedule: Annotated[str, typer.Argument(
                  help="e.g. \"2MB/s 07:00-19:00 Mon-Fri, unlimited otherwise\", "
                       "\"500KB/s\", unlimited.")],
              data: DataOpt = DEFAULT_DATA, json_out: JsonOpt = False) -> None:
    """Set the cap of a scope to a schedule (written to config.toml; a node running on
    this folder takes it within a second, without a restart; PUT /api/v1/limits/SCOPE
    does the same through the API).

    Example: syncnode limit set --data /srv/syncnode in "2MB/s 07:00-19:00 Mon-Fri"
    """
    try:
        result = open_service(data, identity=False).set_limit(scope, schedule)
    except ServiceError as exc:
        refused(exc)
    audit_write(data, "config-changed", subject="bandwidth_caps", count=1)
    if json_out:
        print_json(result)
        return
    out.print(f"{result['scope']}: {result['schedule']} (now: "
              f"{result['in_force'].get(result['scope'], 'unlimited')})",
              markup=False, highlight=False)


@limit_app.command("clear")
def limit_clear(scope: ScopeArg, data: DataOpt = DEFAULT_DATA) -> None:
    """Remove the cap of a scope (unlimited from then on)."""
    try:
        result = open_service(data, identity=False).clear_limit(scope)
    except ServiceError as exc:
        refused(exc)
    audit_write(data, "config-changed", subject="bandwidth_caps", count=1)
    out.print(f"{result['scope']}: unlimited", markup=False, highlight=False)


@app.command()
def run(
    data: DataOpt = DEFAULT_DATA,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM SCP port [11112].")] = None,
    ae_title: Annotated[str | None, typer.Option(help="AE title of the SCP [SYNCNODE].")]
    = None,
    peer_port: Annotated[int | None, typer.Option(help="Peer (mTLS) port [8443].")] = None,
    peer_host: Annotated[str | None, typer.Option(help="Peer listen address [0.0.0.0].")]
    = None,
    api_port: Annotated[int | None, typer.Option(help="Admin API port [8080].")] = None,
    api_host: Annotated[str | None, typer.Option(help="Admin API address [127.0.0.1].")]
    = None,
    export: Annotated[list[str] | None, typer.Option(
        help="Local PACS to deliver to, AE@HOST:PORT (repeatable).")] = None,
    import_from: Annotated[list[str] | None, typer.Option(
        help="PACS to poll for new studies and retrieve by C-MOVE, AE@HOST:PORT "
             "(repeatable).")] = None,
    discovery: Annotated[bool | None, typer.Option(
        "--discovery/--no-discovery",
        help="Advertise this node and list others on the LAN with mDNS [off].")] = None,
    sync_interval: Annotated[float | None, typer.Option(
        help="Seconds between sync rounds per peer [5].")] = None,
    duration: Annotated[float | None, typer.Option(
        help="Stop after this many seconds (for tests and demos).")] = None,
    log_format: Annotated[str | None, typer.Option(
        help="Log lines as key=value (kv) or json [kv].")] = None,
    log_level: Annotated[str | None, typer.Option(
        help="debug, info, warning or error [info].")] = None,
) -> None:
    """Run the node: peer server, sync with every trusted peer (and the DICOM bridge,
    admin API and discovery where configured). Stops cleanly on Ctrl-C / SIGTERM."""
    import asyncio

    from . import config as cfg
    from .admin.api import UnsafeBinding
    from .logs import setup_logging
    from .node import AlreadyRunning, StartFailed
    from .node import run as run_node

    node = open_node(data)
    try:
        settings = node.settings(dicom_port=dicom_port, ae_title=ae_title, peer_port=peer_port,
                                 peer_host=peer_host, api_port=api_port, api_host=api_host,
                                 export=export, import_from=import_from,
                                 discovery=discovery,
                                 sync_interval=sync_interval, log_format=log_format,
                                 log_level=log_level)
    except cfg.ConfigError as exc:
        fail(str(exc))
    setup_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(run_node(node, settings, duration))
    except (AlreadyRunning, UnsafeBinding, cfg.ConfigError, StartFailed) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot start: {exc}")


@app.command()
def demo(duration: Annotated[float | None, typer.Option(
            help="Keep the nodes running this many seconds in all, to watch the dashboards "
                 "(default: stop as soon as they converge).")] = None,
         timeout: Annotated[float, typer.Option(
            help="Give up (exit 1) if the nodes have not converged after this many "
                 "seconds.")] = 300.0,
         keep: Annotated[Path | None, typer.Option(
            help="Use this folder and keep it afterwards (default: a temp folder, removed).")]
         = None) -> None:
    """Start three nodes on loopback, import a generated study at one, watch the others
    receive it. Exit 0 once all three hold the same catalog (exit 1 if they do not within
    --timeout); Ctrl-C stops earlier."""
    from .demo import run_demo

    if not run_demo(duration, keep, timeout):
        raise typer.Exit(EXIT_PROBLEMS)


@app.command()
def gc(data: DataOpt = DEFAULT_DATA) -> None:
    """Remove blobs that no live event references, and stale temp files."""
    node = open_node(data)
    out.print(f"{node.gc()} blobs removed")


# -- backup -----------------------------------------------------------------------------------
@app.command("backup")
def backup_cmd(
    dest: Annotated[Path, typer.Argument(help="New (or empty) folder for the backup.")],
    data: DataOpt = DEFAULT_DATA,
    copy: Annotated[bool, typer.Option(
        "--copy", help="Copy blobs even on the same filesystem (default: hard links).")]
    = False,
    json_out: JsonOpt = False,
) -> None:
    """Take a consistent copy of the node while it runs: a catalog snapshot, every blob it
    references, keys, config, trust pins and the audit trail; backup.json records the
    Merkle root. Example: syncnode backup --data /srv/syncnode /backup/syncnode-2026-12-06
    """
    from .backup import BackupError, backup

    try:
        manifest = backup(data, dest, copy=copy)
    except NodeNotInitialised as exc:
        fail(str(exc))
    except BackupError as exc:
        fail(str(exc), EXIT_PROBLEMS)
    if json_out:
        print_json(manifest.to_dict())
        return
    out.print(f"backup of node {manifest.node_id} in {dest}: {manifest.instances} instances, "
              f"{manifest.blobs} blobs ({manifest.blob_bytes / 1e6:.1f} MB, "
              f"{manifest.linked} hard-linked), Merkle root {manifest.merkle_root[:16]}…")


@app.command("restore")
def restore_cmd(
    backup_dir: Annotated[Path, typer.Argument(help="A folder made by `syncnode backup`.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="New (or empty) data folder.")],
    copy: Annotated[bool, typer.Option(
        "--copy", help="Copy blobs even on the same filesystem (default: hard links).")]
    = False,
    json_out: JsonOpt = False,
) -> None:
    """Make a new data folder from a backup and check its Merkle root against the
    manifest. The node then catches up from its peers when it runs. Example:
    syncnode restore /backup/syncnode-2026-12-06 --data /srv/syncnode"""
    from .backup import BackupError, restore

    try:
        manifest = restore(backup_dir, data, copy=copy)
    except BackupError as exc:
        fail(str(exc), EXIT_PROBLEMS)
    if json_out:
        print_json(manifest.to_dict())
        return
    out.print(f"restored node {manifest.node_id} into {data}: {manifest.instances} "
              f"instances, Merkle root {manifest.merkle_root[:16]}… as in the backup of "
              f"{manifest.created}. Check with: syncnode verify --data {data}")


# -- service ----------------------------------------------------------------------------------
service_app = typer.Typer(help="Run the node as a systemd service.", no_args_is_help=True)
app.add_typer(service_app, name="service")


@service_app.command("install")
def service_install(
    user: Annotated[str, typer.Option(help="The service's own user (create it first).")]
    = "syncnode",
    data: Annotated[Path, typer.Option("--data", "-d", help="Node data folder.")]
    = Path("/var/lib/syncnode"),
    unit_dir: Annotated[Path, typer.Option(help="Where systemd reads unit files.")]
    = Path("/etc/systemd/system"),
    executable: Annotated[str | None, typer.Option(
        help="The syncnode executable [the one running this command].")] = None,
    print_only: Annotated[bool, typer.Option(
        "--print", help="Print the unit instead of writing it.")] = False,
) -> None:
    """Write the hardened systemd unit (syncnode.service) for this data folder, then print
    the commands that create the user and start the service."""
    import shutil
    import sys

    from .unitfile import UnitError, render

    exe = executable or shutil.which("syncnode") or str(Path(sys.argv[0]).resolve())
    try:
        text = render(str(Path(exe).absolute()), user, str(data.absolute()))
    except UnitError as exc:
        fail(str(exc))
    if print_only:
        out.print(text, end="")
        return
    target = unit_dir / "syncnode.service"
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror or exc} (run as root, or --print)")
    d = data.absolute()
    out.print(f"wrote {target}. Then, as root:\n"
              f"  useradd --system --home-dir {d} --shell /usr/sbin/nologin {user}\n"
              f"  install -d -o {user} -g {user} -m 0700 {d}\n"
              f"  sudo -u {user} {exe} init --data {d}\n"
              f"  systemctl daemon-reload && systemctl enable --now syncnode\n"
              f"  journalctl -u syncnode -f")


# -- audit trail ------------------------------------------------------------------------------
audit_app = typer.Typer(help="Read and check the audit trail (who did what, hash-chained).",
                        invoke_without_command=True)
app.add_typer(audit_app, name="audit")


def audit_write(data: Path, action: str, outcome: str = "success", **details: Any) -> None:
    """Record a CLI action (actor cli:<user>); the action is done already, so a trail that
    cannot be written is an error the operator must see (exit 1)."""
    from .audit import AuditError, AuditLog, cli_actor

    trail = AuditLog.for_node(data)
    try:
        trail.write(action, cli_actor(), outcome, **details)
    except (AuditError, OSError) as exc:
        err.print(f"error: done, but not recorded in the audit trail: {exc}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        trail.close()


@audit_app.callback()
def audit_list(ctx: typer.Context, data: DataOpt = DEFAULT_DATA,
               since: Annotated[str | None, typer.Option(
                   help="From this entry number, or this ISO time (UTC if no zone).")]
               = None,
               action: Annotated[str | None, typer.Option(help="Only this action.")] = None,
               json_out: JsonOpt = False) -> None:
    """List audit entries (oldest first). `syncnode audit verify` checks the chain.

    Example: syncnode audit --since 2026-12-06T08:00 --action deleted
    """
    if ctx.invoked_subcommand is not None:
        return
    from .audit import AUDIT_DIR, AuditError, read_entries

    if not (data / "node.crt").is_file():
        fail(f"no node in {data}: run `syncnode init --data {data}` first")
    try:
        entries = list(read_entries(data / AUDIT_DIR, since, action))
    except AuditError as exc:
        fail(str(exc))
    if json_out:
        print_json(entries)
        return
    skip = {"seq", "time", "action", "actor", "outcome", "prev", "hash"}
    for e in entries:
        extra = " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                         for k, v in sorted(e.items()) if k not in skip)
        out.print(f"{e['seq']:>6} {e['time']} {e['action']:<18} {e['outcome']:<7} "
                  f"{e['actor']}  {extra}".rstrip())


@audit_app.command("verify")
def audit_verify(data: DataOpt = DEFAULT_DATA, json_out: JsonOpt = False) -> None:
    """Check the hash chain of the whole trail. Exit 0 intact, 1 broken (names the entry)."""
    from .audit import AUDIT_DIR, AuditError, verify

    if not (data / "node.crt").is_file():
        fail(f"no node in {data}: run `syncnode init --data {data}` first")
    try:
        report = verify(data / AUDIT_DIR)
    except (AuditError, OSError) as exc:
        fail(str(exc))
    if json_out:
        print_json(report.to_dict())
    elif report.ok:
        out.print(f"OK: {report.entries} entries in {len(report.files)} file(s), chain intact, "
                  f"last entry {report.last_seq} {report.last_hash}")
        for seq in report.recoveries:
            out.print(f"  note: entry {seq} records a recovery of the trail (see `syncnode "
                      f"audit --since {seq} --action audit-recovered`)")
    else:
        where = (f" ({report.broken_file} line {report.broken_line})"
                 if report.broken_file else "")
        out.print(f"BROKEN at entry {report.broken_seq}{where}: {report.reason}")
    if not report.ok:
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    app()
