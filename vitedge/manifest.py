"""The manifest: what an artifact is, how to feed it, and how it was proven.

Every artifact vitedge writes (ONNX file, OpenVINO IR, TensorRT engine) gets a JSON sidecar
``<file name>.vitedge.json`` next to it (e.g. ``vit.int8.xml.vitedge.json``; vitedge 0.1's
``<stem>.vitedge.json`` is still read).  It records the model config, the preprocessing and labels (so
the artifact can be served without guessing), input/output names and shapes, precision, the file
hashes, and the measured agreement with the FP32 reference.  Each step copies its parent's
manifest and extends it, so the lineage (export -> quantize -> compile) stays readable.
"""

from __future__ import annotations

import copy
import datetime as _dt
import glob
import json
import os
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ._io import sha256_file, write_json_atomic
from .errors import FileProblem, VitedgeError
from .preprocess import DynamicSize, Preprocessing

MANIFEST_SUFFIX = ".vitedge.json"
BUNDLE_FILE = "vitedge-bundle.json"  # in a recipe's output folder: {"engine": "<file>"}, what vitedge.load(folder) opens
SCHEMA_VERSION = 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("vitedge", "torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out["python"] = platform.python_version()
    return out


@dataclass
class TensorSpec:
    name: str
    shape: list  # ints, or strings for dynamic dims ("batch")
    dtype: str = "float32"

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], list(d["shape"]), d.get("dtype", "float32"))


@dataclass(frozen=True)
class _Section:
    """A typed view of a manifest section (a dict in the JSON): the keys more than one reader uses.
    Unknown keys are left out (a section may hold more, e.g. a backend's own settings)."""

    @classmethod
    def of(cls, section: dict | None):
        section = section or {}
        return cls(**{f.name: section[f.name] for f in fields(cls) if section.get(f.name) is not None})


@dataclass(frozen=True)
class QuantizationRecord(_Section):
    """``Manifest.quantization``: what ``vitedge quantize`` did (see :class:`vitedge.options.QuantizeOptions`)."""

    precision: str | None = None  # what was asked (int8 | fp16 | auto); the manifest's own precision is what was written
    backend: str | None = None
    method: str | None = None  # calibration method (INT8)
    configuration: str | None = None  # the INT8 configuration the fidelity search chose, described
    float_precision: str | None = None  # the float precision the INT8 search measured the model at (f32 | bf16)
    engine_batch: int | None = None  # the batch the chosen INT8 try was measured at
    excluded_nodes: list = field(default_factory=list)  # matrix ops kept in float
    calibration: dict = field(default_factory=dict)  # source, fingerprint, size, seed, ...
    fidelity: dict | None = None  # target, met, table, summary
    choice: dict | None = None  # quantize --auto: which of INT8 / float was written, and why
    max_drop: dict | None = None  # TensorRT sensitivity search: budget_pp, kept_float, report


@dataclass(frozen=True)
class CompileRecord(_Section):
    """``Manifest.compile``: the options an engine was compiled with (the first four are
    :class:`vitedge.options.CompileOptions` fields, as resolved) and what the backend recorded."""

    target: str | None = None
    batch: int | str | None = None  # the engine's batch, or "dynamic"
    hint: str | None = None
    precision_hint: str | None = None
    source: str | None = None  # the file compiled
    compile_seconds: float | None = None
    threads: int | None = None
    device: str | None = None  # OpenVINO
    openvino_config: dict = field(default_factory=dict)  # OpenVINO
    inference_precision: str | None = None  # OpenVINO: the precision the CPU plugin runs float ops in
    blob: dict | None = None  # OpenVINO compiled blob: file, device, openvino
    profile: dict | None = None  # TensorRT optimisation profile
    tensorrt: dict | None = None  # TensorRT version and GPU the engine was built for


@dataclass
class Manifest:
    artifact: str  # file name, relative to the manifest's folder
    format: str  # onnx | openvino | openvino-blob | tensorrt
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8 | mixed
    backend: str | None = None  # onnxruntime | openvino | tensorrt (what the artifact is built for)
    task: str = "classification"  # classification | features (non-classifier outputs)
    model: dict = field(default_factory=dict)  # {"family": "vit", "config": {...}, "source": ...}
    preprocessing: dict = field(default_factory=dict)
    labels: list[str] | None = None
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    opset: int | None = None
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes: a damaged file is named before a parser reads it
    verification: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    compile: dict = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)
    lineage: list[dict] = field(default_factory=list)  # parents, oldest first
    versions: dict = field(default_factory=library_versions)
    created: str = field(default_factory=_now)
    schema_version: int = SCHEMA_VERSION

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = dict(d)
        d["inputs"] = [TensorSpec.from_dict(t) for t in d.get("inputs", [])]
        d["outputs"] = [TensorSpec.from_dict(t) for t in d.get("outputs", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    # -- locations --------------------------------------------------------------------------
    @staticmethod
    def sidecar_path(artifact: str | Path) -> Path:
        """``<file name>.vitedge.json``: named from the full name, so ``m.xml`` and ``m.onnx`` never share one."""
        artifact = Path(artifact)
        return artifact.with_name(artifact.name + MANIFEST_SUFFIX)

    @staticmethod
    def legacy_sidecar_path(artifact: str | Path) -> Path:
        """vitedge 0.1's ``<stem>.vitedge.json`` (still read; it could collide between ``m.xml`` and ``m.onnx``)."""
        artifact = Path(artifact)
        return artifact.with_name(artifact.stem + MANIFEST_SUFFIX)

    def save(self, artifact_path: str | Path) -> Path:
        """Write the sidecar next to ``artifact_path`` (atomically)."""
        path = self.sidecar_path(artifact_path)
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileProblem(f"manifest {path} does not exist") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FileProblem(f"manifest {path} is not a valid vitedge manifest ({exc})", "re-create it with vitedge") from None

    @classmethod
    def find(cls, path: str | os.PathLike) -> tuple[Path, Manifest | None]:
        """Locate an artifact and its manifest from a file, a sidecar or a bundle folder.

        Returns ``(artifact_path, manifest_or_None)``.
        """
        path = Path(path)
        if not path.exists():
            raise FileProblem(f"{path} does not exist")
        if path.is_dir():
            if (path / BUNDLE_FILE).exists():
                try:
                    engine = json.loads((path / BUNDLE_FILE).read_text())["engine"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise FileProblem(f"{path / BUNDLE_FILE} is not a vitedge bundle file ({exc})", "re-run the recipe") from None
                return cls.find(path / engine)
            # engine.<suffix>.vitedge.json, or vitedge 0.1's engine.vitedge.json, or the only manifest
            candidates = (
                [path / f"engine{MANIFEST_SUFFIX}"]
                if (path / f"engine{MANIFEST_SUFFIX}").exists()
                else sorted(path.glob(f"engine.*{MANIFEST_SUFFIX}")) or sorted(path.glob(f"*{MANIFEST_SUFFIX}"))
            )
            if len(candidates) != 1:
                raise VitedgeError(
                    f"folder {path} holds {len(candidates)} vitedge manifests",
                    "point to the artifact file itself, or keep one engine and its manifest in the folder",
                )
            man = cls.load(candidates[0])
            return path / man.artifact, man
        if path.name.endswith(MANIFEST_SUFFIX):
            man = cls.load(path)
            return path.parent / man.artifact, man
        # its own manifest, or (for a companion such as an OpenVINO .blob) the manifest that lists it
        own, legacy = cls.sidecar_path(path), cls.legacy_sidecar_path(path)
        if own.exists():
            man = cls.load(own)
            man.artifact = path.name  # a renamed copy (file and manifest copied together) describes the copy
            return path, man
        for side in sorted(path.parent.glob(f"{glob.escape(path.stem)}.*{MANIFEST_SUFFIX}")):
            man = cls.load(side)
            if path.name in man.files and side != legacy:
                return path, man
        if legacy.exists():
            man = cls.load(legacy)
            if man.artifact == path.name or path.name in man.files:
                return path, man
            if Path(man.artifact).stem == path.stem:  # vitedge 0.1: m.xml and m.onnx shared m.vitedge.json
                raise FileProblem(
                    f"{legacy.name} describes {man.artifact}, not {path.name}",
                    f"{path.name} has no manifest of its own (vitedge 0.1 gave m.xml and m.onnx the same one): "
                    f"re-create it with the vitedge command that wrote it, or open {man.artifact}",
                )
            man.artifact = path.name
            return path, man
        return path, None

    # -- derivation -------------------------------------------------------------------------
    def derive(self, artifact: str, fmt: str, **changes) -> Manifest:
        """A child manifest: same model and preprocessing, parent recorded in the lineage."""
        child = copy.deepcopy(self)
        child.lineage = list(self.lineage) + [{"artifact": self.artifact, "format": self.format, "precision": self.precision, "files": dict(self.files)}]
        child.artifact, child.format = artifact, fmt
        child.files, child.sizes, child.verification, child.created = {}, {}, {}, _now()
        child.versions = library_versions()
        for k, v in changes.items():
            setattr(child, k, v)
        return child

    def hash_files(self, folder: Path, names: list[str]) -> None:
        self.files = {n: sha256_file(folder / n) for n in names}
        self.sizes = {n: (folder / n).stat().st_size for n in names}

    @property
    def quantization_record(self) -> QuantizationRecord:
        """The ``quantization`` section, typed."""
        return QuantizationRecord.of(self.quantization)

    def searched(self, key: str):
        """What the INT8 fidelity search measured and chose (``float_precision``, ``engine_batch``) for an INT8 model,
        or for the FP32 model ``quantize --auto`` wrote because it was faster here; None for any other model."""
        q = self.quantization or {}
        return q.get(key) if self.precision == "int8" or q.get("choice") else None

    @property
    def compile_record(self) -> CompileRecord:
        """The ``compile`` section, typed."""
        return CompileRecord.of(self.compile)

    @property
    def preprocessing_obj(self):
        return Preprocessing.from_dict(self.preprocessing) if self.preprocessing else None

    @property
    def dynamic_size(self) -> DynamicSize | None:
        """The input sizes of a dynamic-size artifact (``vitedge export --dynamic-size``); None for a fixed size."""
        d = (self.preprocessing or {}).get("dynamic_size")
        return DynamicSize(**d) if d else None
