"""The model registry: immutable numbered versions on disk and a serving pointer per model.

Layout under the registry root::

    {name}/{version}/model.safetensors   weights + preprocessing buffers (never pickle)
    {name}/{version}/model.json          spec, features, target, stats, metrics, digest
    {name}/CURRENT                       the serving (newest promoted) version
    {name}/PINNED                        present while CURRENT is pinned: new versions
                                         register without replacing it

A version is written to a temporary directory, fsynced and renamed into place, so a reader
sees either a whole version or none; CURRENT is replaced the same way (write, fsync,
rename). A process killed mid-write leaves only a `.tmp-*` directory, which nothing reads
and the next writing Registry removes. The directory may be shared (a volume on
Kubernetes): serve-only replicas read it while a training Job's rank 0 or a trainer with
role "train" writes; two writers that pick the same next version number do not overwrite
each other (the second rename fails and it takes the next number).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from onehop.errors import FailedPrecondition, InvalidArgument, NotFound
from onehop.keys import validate_name
from trainer_service.checkpoint import disk_errors, fsync_dir, write_atomic
from trainer_service.model import ModelSpec, Preprocessing, TabularModel

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
META = "model.json"
CURRENT = "CURRENT"
PINNED = "PINNED"
FORMAT = 1


@dataclass(frozen=True)
class ModelRecord:
    """Everything model.json says about one registered version."""

    name: str
    version: int
    spec: ModelSpec
    features: tuple[str, ...]
    target: str
    means: tuple[float, ...]
    stds: tuple[float, ...]
    weights_digest: str
    target_mean: float = 0.0
    target_std: float = 1.0
    dataset: str = ""
    dataset_version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    created: float = 0.0

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            self.features, self.means, self.stds, self.target_mean, self.target_std
        )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "spec": self.spec.to_json(),
            "features": list(self.features),
            "target": self.target,
            "means": list(self.means),
            "stds": list(self.stds),
            "target_mean": self.target_mean,
            "target_std": self.target_std,
            "metrics": self.metrics,
            "dataset": self.dataset,
            "dataset_version": self.dataset_version,
            "created": self.created,
            "weights_digest": self.weights_digest,
        }

    @classmethod
    def from_json(cls, data: dict) -> ModelRecord:
        return cls(
            name=str(data["name"]),
            version=int(data["version"]),
            spec=ModelSpec.from_json(data["spec"]),
            features=tuple(str(f) for f in data["features"]),
            target=str(data["target"]),
            means=tuple(float(m) for m in data["means"]),
            stds=tuple(float(s) for s in data["stds"]),
            weights_digest=str(data["weights_digest"]),
            target_mean=float(data.get("target_mean", 0.0)),
            target_std=float(data.get("target_std", 1.0)),
            dataset=str(data.get("dataset", "")),
            dataset_version=int(data.get("dataset_version", 0)),
            metrics={str(k): float(v) for k, v in data.get("metrics", {}).items()},
            created=float(data.get("created", 0.0)),
        )


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


# Versions a register tries before giving up on a directory that other writers keep filling.
_REGISTER_ATTEMPTS = 16


class Registry:
    """Registered models under one directory. Thread-safe; readers in other processes see
    only whole versions.

    `clean_up`: remove what interrupted registers left (a writer's start); a serve-only
    replica passes False, since a `.tmp-*` there may be another process's write in progress.
    `generation` counts this object's own registers and promotions, so a reader in the same
    process (the predictor) notices them at once instead of at its next re-scan.
    """

    def __init__(self, root: Path, clean_up: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.generation = 0
        for leftover in self.root.glob("*/.tmp-*") if clean_up else ():
            log.warning("removing %s, left by an interrupted register", leftover)
            shutil.rmtree(leftover, ignore_errors=True)

    # --- writing -------------------------------------------------------------------------

    def register(
        self,
        name: str,
        model: TabularModel,
        *,
        target: str,
        dataset: str = "",
        dataset_version: int = 0,
        metrics: dict[str, float] | None = None,
        promote: bool = True,
    ) -> ModelRecord:
        """Write `model` as the next version of `name`; make it the serving one if `promote`."""
        validate_name("model", name)
        model_dir = self.root / name
        with self._lock:
            model_dir.mkdir(parents=True, exist_ok=True)
            tmp = model_dir / f".tmp-{uuid.uuid4().hex}"
            try:
                with disk_errors(f"model {name!r}"):
                    tmp.mkdir()
                    weights = tmp / WEIGHTS
                    save_file(model.weights(), str(weights), metadata={"format": str(FORMAT)})
                    with weights.open("rb+") as f:
                        os.fsync(f.fileno())
                    pre = model.preprocessing
                    record = ModelRecord(
                        name=name,
                        version=0,
                        spec=model.spec,
                        features=pre.features,
                        target=target,
                        means=pre.means,
                        stds=pre.stds,
                        target_mean=pre.target_mean,
                        target_std=pre.target_std,
                        weights_digest=file_digest(weights),
                        dataset=dataset,
                        dataset_version=dataset_version,
                        metrics=dict(metrics or {}),
                        created=time.time(),
                    )
                    record = self._publish(tmp, record)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if promote and not self.pinned(name):
                self._write_current(name, record.version)
            self.generation += 1
        log.info("registered model %s version %d (%s)", name, record.version, record.weights_digest)
        return record

    def _publish(self, tmp: Path, record: ModelRecord) -> ModelRecord:
        """Rename the written version `tmp` to the next free number, with model.json naming
        it. Another process may take a number first: its rename wins (a version directory is
        never empty, so a rename onto it fails) and this one tries the next."""
        model_dir = tmp.parent
        for _ in range(_REGISTER_ATTEMPTS):
            version = max(self._versions(record.name), default=0) + 1
            record = dataclasses.replace(record, version=version)
            meta = json.dumps(record.to_json(), indent=2).encode()
            with (tmp / META).open("wb") as f:
                f.write(meta)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            try:
                tmp.rename(model_dir / str(version))
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue
            fsync_dir(model_dir)
            return record
        raise OSError(errno.EEXIST, f"no free version number after {_REGISTER_ATTEMPTS} tries")

    def promote(self, name: str, version: int, pin: bool = False) -> ModelRecord:
        """Point CURRENT at `version` after checking that it loads; a corrupt version is
        refused (FailedPrecondition) and the old one keeps serving. `pin` keeps it serving
        when newer versions register; promoting without `pin` unpins."""
        record = self.record(name, version)
        self.load_weights(record)
        with self._lock:
            self._write_current(name, record.version)
            pinned = self.root / name / PINNED
            if pin:
                write_atomic(pinned, lambda tmp: tmp.write_text(f"{record.version}\n"))
            elif pinned.exists():
                pinned.unlink()
                fsync_dir(pinned.parent)
            self.generation += 1
        log.info("model %s version %d serving%s", name, record.version, " (pinned)" if pin else "")
        return record

    def pinned(self, name: str) -> bool:
        return (self.root / name / PINNED).exists()

    def _write_current(self, name: str, version: int) -> None:
        write_atomic(self.root / name / CURRENT, lambda tmp: tmp.write_text(f"{version}\n"))

    # --- reading -------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and self._versions(p.name)
        )

    def _versions(self, name: str) -> list[int]:
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir())

    def versions(self, name: str) -> list[int]:
        """Every registered version, oldest first; NotFound for an unknown model."""
        validate_name("model", name)
        versions = self._versions(name)
        if not versions:
            raise NotFound(f"no model {name!r}")
        return versions

    def serving_version(self, name: str) -> int:
        """The version CURRENT names (the newest version if there is no pointer yet)."""
        versions = self.versions(name)
        try:
            version = int((self.root / name / CURRENT).read_text().strip())
        except (OSError, ValueError):
            return versions[-1]
        return version if version in versions else versions[-1]

    def resolve(self, name: str, version: int = 0) -> int:
        """0 = the serving version; any other must exist (NotFound)."""
        if version == 0:
            return self.serving_version(name)
        if version < 0:
            raise InvalidArgument(f"model version must be a positive integer, got {version}")
        if version not in self.versions(name):
            raise NotFound(f"model {name!r} has no version {version}")
        return version

    def record(self, name: str, version: int = 0) -> ModelRecord:
        version = self.resolve(name, version)
        path = self.root / name / str(version) / META
        try:
            record = ModelRecord.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("model %s version %d: unreadable %s: %s", name, version, META, exc)
            raise FailedPrecondition(
                f"model {name!r} version {version} is unreadable; register it again"
            ) from None
        if record.name != name or record.version != version:
            raise FailedPrecondition(f"model {name!r} version {version} has mismatched metadata")
        return record

    def load_weights(self, record: ModelRecord, device: str = "cpu") -> dict[str, torch.Tensor]:
        """The version's tensors, checked against the recorded digest (safetensors only)."""
        path = self.root / record.name / str(record.version) / WEIGHTS
        untrusted = FailedPrecondition(
            f"model {record.name!r} version {record.version} has corrupt or missing weights; "
            "register it again"
        )
        try:
            digest = file_digest(path)
        except OSError:
            raise untrusted from None
        if digest != record.weights_digest:
            log.warning("model %s version %d: digest mismatch", record.name, record.version)
            raise untrusted
        try:
            return load_file(str(path), device=device)
        except (SafetensorError, OSError, ValueError, RuntimeError):
            raise untrusted from None

    def load_model(self, record: ModelRecord, device: torch.device) -> TabularModel:
        """An eval-mode module for `record` on `device`."""
        weights = self.load_weights(record)
        model = TabularModel(record.spec, record.preprocessing)
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError:
            raise FailedPrecondition(
                f"model {record.name!r} version {record.version} does not match its spec"
            ) from None
        return model.to(device).eval()
