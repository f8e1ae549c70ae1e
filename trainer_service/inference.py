"""Inference core: registry-backed model loading and prediction, no gRPC.

`Predictor.predict` is synchronous torch work; async callers run it with `asyncio.to_thread`.
A request for version 0 follows the registry's serving pointer on every call, so a newly
promoted version serves without a restart; if that version cannot be loaded, the last good
serving version of the model keeps answering.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from onehop.errors import FailedPrecondition, InvalidArgument, OnehopError
from trainer_service.model import TabularModel, select_device
from trainer_service.registry import ModelRecord, Registry

log = logging.getLogger(__name__)

# A version that failed to load is not retried on every request.
_RETRY_FAILED_AFTER_SECONDS = 30.0


@dataclass(frozen=True)
class LoadedModel:
    record: ModelRecord
    module: TabularModel

    @property
    def n_features(self) -> int:
        return len(self.record.features)


class Predictor:
    """Loads registered versions onto one device (eval mode, LRU-bounded) and runs them."""

    def __init__(self, registry: Registry, device: torch.device | None = None, max_loaded: int = 8):
        self.registry = registry
        self.device = device or select_device()
        self._max_loaded = max_loaded
        self._loaded: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._last_serving: dict[str, LoadedModel] = {}
        self._failed: dict[tuple[str, int], tuple[float, OnehopError]] = {}
        self._lock = threading.Lock()

    def get(self, name: str, version: int = 0) -> LoadedModel:
        """The loaded model for `name`; version 0 = the serving version.

        NotFound for an unknown model or version; FailedPrecondition for a version whose files
        are corrupt (unless version 0 was asked and an earlier serving version is loaded).
        """
        if version:
            return self._load(name, self.registry.resolve(name, version))
        serving = self.registry.serving_version(name)
        try:
            model = self._load(name, serving)
        except FailedPrecondition:
            previous = self._last_serving.get(name)
            if previous is None:
                raise
            log.warning(
                "model %s version %d does not load; still serving version %d",
                name,
                serving,
                previous.record.version,
            )
            return previous
        self._last_serving[name] = model
        return model

    def _load(self, name: str, version: int) -> LoadedModel:
        key = (name, version)
        with self._lock:
            model = self._loaded.get(key)
            if model is not None:
                self._loaded.move_to_end(key)
                return model
            failed = self._failed.get(key)
            if failed and time.monotonic() - failed[0] < _RETRY_FAILED_AFTER_SECONDS:
                raise failed[1]
            try:
                record = self.registry.record(name, version)
                module = self.registry.load_model(record, self.device)
            except FailedPrecondition as exc:
                self._failed[key] = (time.monotonic(), exc)
                raise
            self._failed.pop(key, None)
            model = LoadedModel(record, module)
            self._loaded[key] = model
            while len(self._loaded) > self._max_loaded:
                self._loaded.popitem(last=False)
            log.info("loaded model %s version %d on %s", name, version, self.device)
            return model

    def predict(self, name: str, version: int, x: np.ndarray) -> tuple[np.ndarray, int, str]:
        """Probabilities float32 [n, 1] for RAW features `x` float32 [n, n_features], with the
        version that answered and its weights digest."""
        model = self.get(name, version)
        n = model.n_features
        if x.ndim != 2 or x.shape[1] != n:
            raise InvalidArgument(f"expected [-1, {n}] got {list(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise InvalidArgument("input contains NaN or infinite values; send raw feature values")
        if x.shape[0] == 0:
            probabilities = np.empty((0, 1), dtype=np.float32)
        else:
            with torch.inference_mode():
                logits = model.module(torch.from_numpy(x).to(self.device))
                probabilities = torch.sigmoid(logits.float()).cpu().numpy()
        return probabilities, model.record.version, model.record.weights_digest

    def close(self) -> None:
        with self._lock:
            self._loaded.clear()
            self._last_serving.clear()
