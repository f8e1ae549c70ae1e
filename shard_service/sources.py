"""Where the shard service may read an input file from when asked to ingest one itself: a
path under its source root, or a URI whose scheme is on the allow-list, opened through
`pyarrow.fs` (local files by default; S3 and GCS by URI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from onehop.dataset import file_format, open_batches
from onehop.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable


@dataclass(frozen=True)
class Sources:
    """The rules: `root` confines local paths; `schemes` lists the URI schemes allowed."""

    root: Path
    schemes: tuple[str, ...] = ("file", "s3", "gs")

    def locate(self, source: str) -> tuple[pafs.FileSystem | None, str]:
        """(filesystem, path) for a source; None = the local filesystem, path checked.

        Raises InvalidArgument for an unlisted scheme, PermissionDenied for a local path
        outside the root. Remote filesystems are not built here (see `open`).
        """
        if not source:
            raise InvalidArgument("source is empty: give a path or a URI")
        scheme, separator, rest = source.partition("://")
        if not separator:
            return None, str(self._confined(source))
        scheme = scheme.lower()
        if scheme not in self.schemes:
            raise InvalidArgument(
                f"URI scheme {scheme!r} is not allowed for sources; allowed: "
                + ", ".join(self.schemes)
            )
        if scheme == "file":
            return None, str(self._confined(rest))
        return pafs.FileSystem.from_uri(source)

    def _confined(self, path: str) -> Path:
        root = self.root.resolve()
        resolved = (root / path).resolve()  # also follows symbolic links out of the root
        if not resolved.is_relative_to(root):
            raise PermissionDenied(f"source {path!r} is outside the source root")
        return resolved

    def open(self, source: str, format: str = "") -> pa.RecordBatchReader:
        """A streaming reader over the source (see onehop.dataset.open_batches)."""
        format = file_format(source, format)
        try:
            filesystem, path = self.locate(source)
            if filesystem is None:
                filesystem = pafs.LocalFileSystem()
            file = filesystem.open_input_file(path)
        except FileNotFoundError:
            raise NotFound(f"no such source: {source}") from None
        except IsADirectoryError:
            raise InvalidArgument(f"source {source} is a directory, not a file") from None
        except pa.ArrowInvalid as exc:
            raise InvalidArgument(f"cannot use source {source}: {exc}") from None
        except OSError as exc:
            raise Unavailable(f"cannot open source {source}: {exc.strerror or exc}") from None
        return open_batches(file, format, source)
