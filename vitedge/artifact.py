"""Artifacts: a file vitedge wrote, the files that belong to it, and its manifest.

:class:`Artifact` is what ``export``, ``quantize`` and ``compile`` return and what ``vitedge.load``
opens.  It unpacks as ``path, manifest`` (the return value of vitedge 0.1).

:func:`writing` is the one way an artifact reaches the disk::

    with writing(output) as draft:        # a scratch folder beside ``output``
        ...write draft.path ...           # the main file (and companions: .bin, .data)
        artifact = draft.commit(manifest, files)

``commit`` hashes the files into the manifest, writes the manifest once
(``<file name>.vitedge.json``: named from the full file name, so ``vit.int8.xml`` and
``vit.int8.onnx`` never share one), and renames everything into place.  An existing output is
replaced (each rename is atomic) and the replaced files are reported.  When anything fails before
the commit, nothing is left behind; an OS error on the output location (parent is a file,
read-only folder, disk full) becomes one :class:`~vitedge.errors.FileProblem` line.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._io import atomic_dir, commit_files, sha256_file
from .backends import registry
from .errors import FileProblem, first_line
from .manifest import Manifest
from .ui import note

_OS_ADVICE: dict[int | None, str] = {  # keyed by OSError.errno, which may be None
    errno.ENOSPC: "free some space or write elsewhere (-o)",
    errno.EDQUOT: "free some space or write elsewhere (-o)",
    errno.EACCES: "choose a folder you can write to (-o)",
    errno.EPERM: "choose a folder you can write to (-o)",
    errno.EROFS: "the file system is read-only: choose another folder (-o)",
    errno.ENOTDIR: "a path component is a file, not a folder: choose another -o",
    errno.EEXIST: "a path component is a file, not a folder: choose another -o",
}


@dataclass
class Artifact:
    """One artifact on disk: its main file and its manifest (which lists every file and its hash)."""

    path: Path
    manifest: Manifest

    # ``path, manifest = export_onnx(...)`` and ``result[0]`` keep working (0.1 returned that tuple)
    def __iter__(self):
        yield self.path
        yield self.manifest

    def __getitem__(self, index):
        return (self.path, self.manifest)[index]

    def __len__(self) -> int:
        return 2

    @property
    def manifest_path(self) -> Path:
        return Manifest.sidecar_path(self.path)

    @property
    def files(self) -> list[Path]:
        """Every file of the artifact (main file, weights, blob), as recorded in the manifest."""
        names = list(self.manifest.files) or [self.path.name]
        return [self.path.parent / n for n in names]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files if p.exists())

    @classmethod
    def open(cls, path: str | os.PathLike) -> Artifact:
        """The artifact at a file, its manifest or a bundle folder; refused when it has no vitedge manifest."""
        artifact, man = Manifest.find(path)
        if man is None:
            raise FileProblem(
                f"{artifact} has no vitedge manifest ({Manifest.sidecar_path(artifact).name})",
                "open it with vitedge.load (ONNX files made elsewhere are described on the fly)",
            )
        if not artifact.exists():
            raise FileProblem(f"artifact {artifact} named by the manifest does not exist")
        return cls(artifact, man)

    def load(self, backend: str | None = None, **options):
        """Open the artifact as an engine (see :func:`vitedge.load`): with ``backend``, else the manifest's
        backend when it runs this kind of file, else the registered backend for the file's suffix."""
        if backend is None:
            backend = self.manifest.backend
            if backend is None or self.path.suffix.lower() not in registry.get(backend).runs:
                found = registry.for_file(self.path)
                if found is None:
                    raise FileProblem(f"cannot tell which backend runs {self.path}", f"pass backend= one of {', '.join(registry.names())}")
                backend = found.name
        registry.get(backend)  # an unknown name is its own error, before the files are looked at
        check_files(self.path, self.manifest)
        try:
            return registry.open_engine(backend, self.path, self.manifest, **options)
        except Exception as exc:
            problem = changed_file(self.path, self.manifest, exc)
            if problem is None:
                raise
            raise problem from None


def _remake(manifest: Manifest) -> str:
    """The vitedge command that writes this kind of artifact again."""
    return "vitedge compile" if manifest.compile else "vitedge quantize" if manifest.quantization else "vitedge export"


def _on_disk(artifact: Path, manifest: Manifest, name: str) -> Path:
    """Where a file the manifest lists is: beside ``artifact``, under the name it was written with - but a renamed
    copy (file and manifest copied together, see :meth:`Manifest.find`) renames its main file and an IR's ``.bin``."""
    main = next(iter(manifest.files or manifest.sizes), None)
    if main is not None and main != artifact.name and manifest.artifact == artifact.name and Path(main).suffix == artifact.suffix:
        if name == main:
            return artifact
        if name == Path(main).with_suffix(".bin").name and artifact.suffix == ".xml":
            return artifact.with_suffix(".bin")
    return artifact.parent / name


def check_files(artifact: Path, manifest: Manifest) -> None:
    """Name a damaged file before a runtime's parser sees it: every file the manifest lists must have the size it
    recorded (a truncated copy otherwise fails deep in OpenVINO or ONNX Runtime with a message about neither).
    Files the manifest does not size (manifests before vitedge recorded sizes) are left to :func:`changed_file`."""
    fix = f"copy it again, or re-run `{_remake(manifest)}`"
    for name, want in manifest.sizes.items():
        path = _on_disk(artifact, manifest, name)
        if not path.exists():
            continue  # a missing file: the runtime names it
        have = path.stat().st_size
        if have < want:
            raise FileProblem(f"{path.name} is truncated: {have:,} of {want:,} bytes", fix)
        if have > want:
            raise FileProblem(f"{path.name} is {have - want:,} bytes longer than vitedge wrote it ({want:,} bytes)", fix)


def changed_file(artifact: Path, manifest: Manifest, exc: BaseException) -> FileProblem | None:
    """After a runtime failed to read ``artifact``: the error naming a file whose SHA-256 is no longer the one the
    manifest records (hashed only now, on failure), or None when every file is as vitedge wrote it."""
    for name, want in manifest.files.items():
        path = _on_disk(artifact, manifest, name)
        if path.exists() and sha256_file(path) != want:
            return FileProblem(
                f"{path.name} has changed since vitedge wrote it (its SHA-256 is not the manifest's) and cannot be read: {first_line(exc, 120)}",
                f"copy it again, or re-run `{_remake(manifest)}`",
            )
    return None


class Draft:
    """An artifact being written: files go to ``scratch`` and are moved out by :meth:`commit`."""

    def __init__(self, output: Path, scratch: Path):
        self.output = output
        self.scratch = scratch
        self.artifact: Artifact | None = None

    @property
    def path(self) -> Path:
        """Where the main file is written before the commit."""
        return self.scratch / self.output.name

    def commit(self, manifest: Manifest, files: Sequence[str] | None = None, extra: Sequence[str] = ()) -> Artifact:
        """Hash ``files`` (default: the main file and its companions in scratch) into ``manifest``, write it
        once, and move the files, the manifest and ``extra`` files (reports, not hashed) into place."""
        if self.artifact is not None:
            raise RuntimeError(f"{self.output} was already committed")
        files = list(files) if files is not None else companions(self.scratch, self.output.name)
        manifest.artifact = self.output.name
        manifest.hash_files(self.scratch, files)
        side = Manifest.sidecar_path(self.output).name
        manifest.save(self.scratch / self.output.name)
        names = files + [side] + list(extra)
        dest = self.output.parent
        replaced = [n for n in names if (dest / n).exists()]
        commit_files(self.scratch, {n: dest / n for n in names})
        _drop_legacy_sidecar(self.output)
        if replaced:
            note(f"replaced the existing {', '.join(replaced)} in {dest}")
        self.artifact = Artifact(self.output, manifest)
        return self.artifact


def companions(folder: Path, name: str) -> list[str]:
    """The main file and the files that belong to it: ONNX external data, an OpenVINO IR's ``.bin``."""
    out = [name]
    weights = Path(name).with_suffix(".bin").name
    if name.endswith(".xml") and (folder / weights).exists():
        out.append(weights)
    out += sorted(p.name for p in folder.glob(glob.escape(name) + ".data*"))
    return out


def _drop_legacy_sidecar(output: Path) -> None:
    """vitedge 0.1 named manifests ``<stem>.vitedge.json``; remove the one that described the file just replaced."""
    legacy = Manifest.legacy_sidecar_path(output)
    if legacy.exists():
        with contextlib.suppress(Exception):
            if Manifest.load(legacy).artifact == output.name:
                legacy.unlink()


def _os_problem(exc: OSError, output: Path) -> FileProblem:
    what = exc.strerror or type(exc).__name__
    where = exc.filename or output
    return FileProblem(f"cannot write {output}: {what} ({where})", _OS_ADVICE.get(exc.errno, "check the output path (-o)"))


def check_output(output: str | os.PathLike, *, folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: a command that runs for minutes must not fail
    at its last step.  ``output`` is a file (``folder=False``) or a folder the command fills.

    The nearest existing folder on the way must be a folder (not a file) and accept a file: one is created and
    removed there (permissions alone say nothing for root or on a read-only mount).  Nothing is created.
    Returns ``output`` as a Path; raises a one-line :class:`~vitedge.errors.FileProblem`."""
    output = Path(output)
    if folder and output.exists() and not output.is_dir():
        raise FileProblem(f"cannot write into {output}: it is a file, not a folder", "choose a folder for -o")
    if not folder and output.is_dir():
        raise FileProblem(f"cannot write {output}: it is a folder", "give a file name for -o")
    target = output if folder else output.parent
    existing = next(p for p in (target, *target.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise FileProblem(f"cannot write {output}: {existing} is a file, not a folder", _OS_ADVICE[errno.ENOTDIR])
    try:
        fd, probe = tempfile.mkstemp(prefix=".vitedge-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _os_problem(exc, output) from None
    return output


@contextlib.contextmanager
def writing(output: str | os.PathLike) -> Iterator[Draft]:
    """Write an artifact to ``output`` all-or-nothing (see the module docstring)."""
    output = Path(output)
    try:
        with atomic_dir(output.parent) as scratch:
            draft = Draft(output, scratch)
            yield draft
    except OSError as exc:
        # only errors about the output location: a missing input keeps its own error
        if _about_output(exc, output):
            raise _os_problem(exc, output) from None
        raise


def _about_output(exc: OSError, output: Path) -> bool:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or not exc.filename:
        return True
    where, parent = Path(os.fsdecode(exc.filename)).resolve(), output.parent.resolve()
    return where == parent or parent in where.parents or where in parent.parents
