"""The OHIF web viewer a node serves at ``/viewer/``: installing and checking its files.

The npm package ``@ohif/app`` ships a built viewer in ``dist/`` (static HTML, JavaScript,
WebAssembly). This module puts one pinned version of it into a folder (the node's
``viewer_dir``, by default ``DATA/viewer``); :mod:`syncnode.admin.viewer` serves that
folder. Vocabulary and invariants:

- **Source.** The npm tarball (``npm pack @ohif/app@PINNED``, or a ``.tgz`` the operator
  copied), an unpacked package folder (``package.json`` + ``dist/``) or a bare ``dist/``
  folder. The pinned version's tarball is checked against its npm ``integrity`` digest;
  another version is accepted only from a file or folder the operator names.
- **Base path.** The build assumes it is served at ``/``; the node serves it at
  ``/viewer/``. Installing rewrites the few places that name the base (``index.html``'s
  links and ``window.PUBLIC_URL``, each bundle's webpack public path) and refuses a build
  where they are not found, instead of installing a viewer that loads nothing.
- **Atomic.** The files are unpacked and rewritten in a staging folder beside the target,
  checked, and then swapped in by two renames: a viewer folder is the old install or the
  new one, never a mixture (between the renames it is absent for an instant, and a page
  requested then gets a 404). ``syncnode-viewer.json`` in it records the package, version,
  source digest, file count and size; its presence is what "installed" means.
- The shipped ``app-config.js`` is not used: the node generates its own at serve time, whose
  data source is the node's DICOMweb on the same origin.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PACKAGE = "@ohif/app"
PINNED_VERSION = "3.13.2"
# npm's integrity digest (dist.integrity) of @ohif/app-3.13.2.tgz: what `npm pack` must give.
PINNED_INTEGRITY = ("sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87"
                    "BKxFfpq+jd5xXZB9E8EA==")
BASE = "/viewer/"
MANIFEST = "syncnode-viewer.json"
NPM_TIMEOUT = 600.0  # seconds `npm pack` may take (a 50 MB download on a slow link)
# The build's own config and the files of other hosting services: never served.
DROPPED = ("app-config.js", "_headers", "_redirects", "serve.json")
COMPRESSIBLE = frozenset({".js", ".mjs", ".css", ".wasm", ".json", ".svg", ".map", ".html",
                          ".txt", ".xml"})
_WEBPACK_BASE = re.compile(rb'__webpack_require__\.p = "/";')
_HTML_BASE = re.compile(r'((?:src|href)=")/(?!/)')
_CSS_BASE = re.compile(r"url\(/(?!/)")


class ViewerError(Exception):
    """The viewer cannot be installed or served; the message says what to do."""


class ViewerNotInstalled(ViewerError):
    pass


@dataclass(frozen=True, slots=True)
class ViewerInfo:
    """What ``syncnode-viewer.json`` records about an installed viewer."""

    package: str
    version: str
    source_sha512: str  # base64, as npm writes it ("" for a folder source)
    files: int
    bytes: int
    base: str
    installed_at: float
    path: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def folder_of(data: Path, setting: str) -> Path:
    """Where the viewer lives: the ``viewer_dir`` setting (relative to the data folder),
    by default ``DATA/viewer``."""
    return data / (setting or "viewer")


def installed(folder: Path) -> ViewerInfo:
    """The viewer installed in ``folder``, checked: manifest, ``index.html``, the app bundle
    it loads. Raises :class:`ViewerNotInstalled` with the command that fixes it."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ViewerNotInstalled(
            f"no viewer is installed in {folder}: run `syncnode viewer install` (it fetches "
            f"{PACKAGE}@{PINNED_VERSION} with npm, or give --from a copy of the package)")
    try:
        raw = json.loads(manifest.read_text())
        info = ViewerInfo(**{k: raw[k] for k in ViewerInfo.__dataclass_fields__ if k != "path"},
                          path=str(folder.resolve()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ViewerNotInstalled(f"{manifest} is damaged ({exc}): run `syncnode viewer "
                                 "install` again") from None
    index = folder / "index.html"
    if not index.is_file():
        raise ViewerNotInstalled(f"{index} is missing: run `syncnode viewer install` again")
    for script in re.findall(r'<script[^>]*\bsrc="([^"]+)"', index.read_text()):
        name = script.removeprefix(info.base)
        if name != "app-config.js" and not (folder / name).is_file():
            raise ViewerNotInstalled(f"{folder / name} (loaded by index.html) is missing: run "
                                     "`syncnode viewer install` again")
    return info


def _integrity(path: Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return base64.b64encode(digest.digest()).decode()


def npm_pack(dest: Path, *, npm: str | None = None, version: str = PINNED_VERSION) -> Path:
    """``npm pack @ohif/app@VERSION`` into ``dest`` (npm's own cache makes a rerun local)."""
    npm = npm or shutil.which("npm")
    if npm is None:
        raise ViewerError(
            f"npm is not installed here. On a machine with npm run `npm pack "
            f"{PACKAGE}@{version}`, copy the file ohif-app-{version}.tgz to this machine and "
            f"run `syncnode viewer install --from ohif-app-{version}.tgz`")
    try:
        proc = subprocess.run([npm, "pack", f"{PACKAGE}@{version}", "--json", "--silent",
                               "--pack-destination", str(dest)],
                              capture_output=True, text=True, timeout=NPM_TIMEOUT, check=False)
    except OSError as exc:
        raise ViewerError(f"cannot run {npm}: {exc}; install npm, or give --from a copy of "
                          f"{PACKAGE}@{version} (`npm pack {PACKAGE}@{version}` elsewhere)"
                          ) from None
    except subprocess.TimeoutExpired:
        raise ViewerError(f"`npm pack {PACKAGE}@{version}` took over {NPM_TIMEOUT:g} s: check "
                          "the network or the npm registry setting (npm config get "
                          "registry), or give --from a copy of the package") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ViewerError(f"`npm pack {PACKAGE}@{version}` failed: {' / '.join(tail)}; check "
                          "the network and `npm config get registry`, or give --from a copy "
                          "of the package")
    found = sorted(dest.glob("*.tgz"))
    if len(found) != 1:
        raise ViewerError(f"`npm pack` left {len(found)} tarballs in {dest}, expected one")
    return found[0]


def _unpack(tgz: Path, into: Path) -> Path:
    """Extract an npm tarball (``package/...``) safely; returns the package folder."""
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            tar.extractall(into, filter="data")  # no absolute paths, links out, devices
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ViewerError(f"{tgz} is not a readable npm package tarball: {exc}") from None
    package = into / "package"
    if not package.is_dir():
        raise ViewerError(f"{tgz} has no package/ folder: it is not an npm package tarball")
    return package


def _version_of(package_dir: Path | None) -> tuple[str, str]:
    if package_dir is None or not (package_dir / "package.json").is_file():
        return PACKAGE, "unknown"
    try:
        meta = json.loads((package_dir / "package.json").read_text())
    except ValueError as exc:
        raise ViewerError(f"{package_dir / 'package.json'} is not JSON: {exc}") from None
    return str(meta.get("name", PACKAGE)), str(meta.get("version", "unknown"))


def rebase(dist: Path, base: str = BASE) -> int:
    """Rewrite a build made for ``/`` to be served at ``base``; returns the files changed.
    Raises :class:`ViewerError` if the places that name the base are not where expected."""
    index = dist / "index.html"
    html = index.read_text()
    if 'window.PUBLIC_URL="/"' not in html:
        raise ViewerError(f"{index} does not set window.PUBLIC_URL=\"/\": this build of the "
                          "viewer is not one syncnode knows how to serve at /viewer/")
    html = html.replace('window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{base}"')
    html = _HTML_BASE.sub(lambda m: m.group(1) + base, html)
    index.write_text(html)
    changed = 1
    for path in dist.rglob("*.js"):
        data = path.read_bytes()
        if b'__webpack_require__.p = "/"' in data:
            path.write_bytes(_WEBPACK_BASE.sub(
                f'__webpack_require__.p = "{base}";'.encode(), data))
            changed += 1
    for path in dist.rglob("*.css"):  # fonts named from the root: url(/abc.woff2)
        text = path.read_text()
        if "url(/" in text:
            path.write_text(_CSS_BASE.sub(f"url({base}", text))
            changed += 1
    app = list(dist.glob("app.bundle.*.js"))
    if len(app) != 1 or f'__webpack_require__.p = "{base}"'.encode() not in app[0].read_bytes():
        raise ViewerError(f"{dist}: the app bundle's public path was not found: this build of "
                          "the viewer is not one syncnode knows how to serve at /viewer/")
    return changed


def precompress(dist: Path, level: int = 6) -> int:
    """Write ``NAME.gz`` beside every compressible file (scripts, styles, WebAssembly), which
    the server sends to browsers that accept gzip: the app bundle is 17 MB as built, 4 MB
    gzipped, which matters on a site-to-site link. Returns the files compressed."""
    done = 0
    for path in sorted(dist.rglob("*")):
        if path.suffix not in COMPRESSIBLE or not path.is_file() or path.name == "index.html":
            continue
        data = path.read_bytes()
        if len(data) < 1024:
            continue
        packed = gzip.compress(data, compresslevel=level, mtime=0)
        if len(packed) < len(data) * 0.9:
            path.with_name(path.name + ".gz").write_bytes(packed)
            done += 1
    return done


def install(target: Path, source: Path | None = None, *, npm: str | None = None,
            base: str = BASE) -> ViewerInfo:
    """Install the viewer into ``target`` from ``source`` (a ``.tgz``, a package folder or a
    ``dist/`` folder; ``None``: ``npm pack`` the pinned version). Atomic: see the module."""
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".viewer-stage-", dir=target.parent))
    try:
        digest = ""
        package_dir: Path | None = None
        if source is None:
            (stage / "pack").mkdir()
            source = npm_pack(stage / "pack", npm=npm)
        if source.is_file():
            digest = _integrity(source)
            package_dir = _unpack(source, stage / "unpacked")
            dist = package_dir / "dist"
        elif (source / "dist" / "index.html").is_file():
            package_dir, dist = source, source / "dist"
        elif (source / "index.html").is_file():
            package_dir = source.parent if (source.parent / "package.json").is_file() else None
            dist = source
        else:
            raise ViewerError(f"{source} is neither an npm tarball of {PACKAGE} nor a folder "
                              "with a built viewer (dist/index.html)")
        name, version = _version_of(package_dir)
        if name != PACKAGE:
            raise ViewerError(f"{source} is the npm package {name}, not {PACKAGE}")
        if version == PINNED_VERSION and digest and f"sha512-{digest}" != PINNED_INTEGRITY:
            raise ViewerError(f"{source} claims to be {PACKAGE}@{version} but its digest is "
                              f"not the one npm publishes for it: refusing a modified package")
        if not (dist / "index.html").is_file():
            raise ViewerError(f"{source} has no dist/index.html: not a built viewer")
        files = stage / "files"
        if dist.is_relative_to(stage):
            dist.rename(files)  # unpacked here: ours to change
        else:
            shutil.copytree(dist, files)  # a folder source is never changed in place
        for name_ in DROPPED:
            (files / name_).unlink(missing_ok=True)
        rebase(files, base)
        precompress(files)
        count = size = 0
        for p in files.rglob("*"):
            if p.is_file():
                count += 1
                size += p.stat().st_size
        info = ViewerInfo(PACKAGE, version, digest, count, size, base, time.time())
        body = {k: v for k, v in info.to_dict().items() if k != "path"}
        (files / MANIFEST).write_text(json.dumps(body, indent=2) + "\n")
        installed(files)  # the staged copy must pass the same check as the served one
        if target.exists():
            target.rename(stage / "old")  # removed with the stage
        files.rename(target)
        return installed(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def current(target: Path) -> ViewerInfo | None:
    """The installed viewer if it is the pinned version and whole, else ``None``."""
    try:
        info = installed(target)
    except ViewerNotInstalled:
        return None
    return info if info.version == PINNED_VERSION else None
