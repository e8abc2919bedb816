"""Turn a source's image values into image files dpalign records can point at.

Two kinds of value:

* a path string (or an HF image dict ``{"bytes": None, "path": "a.jpg"}``): resolved against
  the image folder (``--images``; default the source file's folder) unless absolute; the file
  must exist and open as an image;
* embedded bytes (an HF image dict ``{"bytes": b"...", "path": ...}``, as Parquet exports of
  ``datasets.Image`` columns store them; a JSON list of byte values is accepted too): written
  unchanged to ``<OUT stem>_images/<sha256 prefix>.<ext>`` beside the output file.

``resolve`` returns absolute paths; the output file stores every one of them relative to its
own folder (``<OUT stem>_images/<name>``, ``../coco/1.jpg``), see ``write_preference_jsonl``.

Embedded images are named by their content, so equal images are stored once and the names do
not depend on row order. They are staged in a hidden folder next to the output and moved into
place only by ``commit()``; ``discard()`` removes the staging folder, so a failed conversion
leaves nothing behind. Committing only adds files (a name always means the same bytes), so an
older output file that points into the same folder stays valid.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dpalign.data.convert.base import ImageRef, RowError
from dpalign.data.schema import json_type_name
from dpalign.io import atomic_write_bytes

HASH_CHARS = 20
_NOT_FOUND = "not found"
_EXTENSIONS: dict[str, str] = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp",
                               "BMP": ".bmp", "TIFF": ".tif"}


def images_dir_for(out: Path) -> Path:
    """Where embedded images of the output file ``out`` go: ``<dir>/<stem>_images``."""
    return out.parent / f"{out.stem}_images"


def image_format(data: bytes) -> str:
    """PIL's name for the format of encoded image ``data``; raises if it is not an image."""
    with Image.open(io.BytesIO(data)) as image:
        name = image.format or "PNG"
        image.verify()
    return name


def embedded_name(data: bytes, format_name: str) -> str:
    """The deterministic file name of embedded image ``data``: content hash + extension."""
    digest = hashlib.sha256(data).hexdigest()[:HASH_CHARS]
    return digest + _EXTENSIONS.get(format_name, f".{format_name.lower()}")


def _as_bytes(value: object, where: str) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value)
    raise RowError(f"field '{where}' must be binary image data, got {json_type_name(value)}")


class ImageStore:
    """Resolves ``ImageRef``s to absolute image paths for one conversion.

    ``folder`` is where embedded images go (``images_dir_for(out)`` for an output file);
    ``image_root`` is what relative image paths are relative to. With ``check_files=False``
    image files named by path are taken as they are (not opened).
    """

    def __init__(self, folder: Path, image_root: Path, *, check_files: bool = True) -> None:
        self.final = folder.absolute()
        self.image_root = image_root.absolute()
        self.check_files = check_files
        self._staging: Path | None = None
        self._staged: set[str] = set()
        self._path_problems: dict[Path, str | None] = {}

    @property
    def n_embedded(self) -> int:
        """Distinct embedded images written (or to be written) to the images folder."""
        return len(self._staged)

    def resolve(self, ref: ImageRef) -> str:
        """The absolute path the record should store for ``ref``; ``RowError`` if unusable."""
        value = ref.value
        if isinstance(value, Mapping):
            if value.get("bytes") is not None:
                return self._embed(_as_bytes(value["bytes"], f"{ref.field}.bytes"), ref.field)
            if value.get("path") is not None:
                return self._on_disk(value["path"], f"{ref.field}.path")
            raise RowError(f"field '{ref.field}' has neither 'bytes' nor 'path'")
        if isinstance(value, str):
            return self._on_disk(value, ref.field)
        raise RowError(f"field '{ref.field}' must be an image path or an object with "
                       f"'bytes'/'path', got {json_type_name(value)}")

    def _on_disk(self, value: object, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise RowError(f"field '{where}' must be a non-empty path string, "
                           f"got {json_type_name(value)}")
        path = Path(os.path.normpath(self.image_root / Path(value).expanduser()))
        if not self.check_files:
            return str(path)
        if path not in self._path_problems:
            self._path_problems[path] = _file_problem(path)
        problem = self._path_problems[path]
        if problem is None:
            return str(path)
        if problem == _NOT_FOUND and not Path(value).expanduser().is_absolute():
            problem = f"not found under the image folder {self.image_root} (looked at {path})"
        elif problem == _NOT_FOUND:
            problem = f"not found (looked at {path})"
        raise RowError(f"image '{value}' (field '{where}') {problem}")

    def _embed(self, data: bytes, where: str) -> str:
        try:
            name = embedded_name(data, image_format(data))
        except UnidentifiedImageError as error:
            raise RowError(f"field '{where}' holds bytes that are not a readable image "
                           f"(unknown format, {len(data)} bytes)") from error
        except Exception as error:  # PIL raises many types for bad bytes; all mean unreadable
            raise RowError(f"field '{where}' holds bytes that are not a readable image: "
                           f"{error}") from error
        if name not in self._staged:
            if not (self.final / name).is_file():
                atomic_write_bytes(self._staging_dir() / name, data)
            self._staged.add(name)
        return str(self.final / name)

    def _staging_dir(self) -> Path:
        if self._staging is None:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._staging = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.",
                                                  dir=self.final.parent))
        return self._staging

    def commit(self) -> None:
        """Move staged images into the images folder (a new folder moves as a whole)."""
        if self._staging is None:
            return
        if not self.final.exists():
            try:
                self._staging.rename(self.final)
                self._staging = None
                return
            except OSError:  # another process made the folder meanwhile: add files to it
                pass
        for staged in sorted(self._staging.iterdir()):
            os.replace(staged, self.final / staged.name)
        self._staging.rmdir()
        self._staging = None

    def discard(self) -> None:
        """Remove staged images (after an error): nothing is left beside the output."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


def _file_problem(path: Path) -> str | None:
    """Why the image file at ``path`` cannot be used, or None when it opens as an image."""
    if not path.is_file():
        return _NOT_FOUND
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for corrupt files; all mean unreadable
        return f"cannot be read as an image: {error}"
    return None
