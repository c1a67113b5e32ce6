"""What the web page may read and write: the bundled sample pair, the ``--data`` folder and the uploads folder.

Every file the page names is a *file id*, ``<root>/<relative path>`` (``sample/fixed_img.nii.gz``,
``data/subject1/t1.nii.gz``, ``uploads/scan.nii.gz``); `FileStore.resolve` is the only way from an
id to a path. It refuses unknown roots, absolute paths, ``..``, backslashes and control
characters, anything that is not a regular file, and any path whose real location (symlinks
followed) lies outside its root. The page never writes anywhere but the uploads folder, and
writes there only through `FileStore.save_upload`: a plain file name with a supported extension,
at most ``max_upload_bytes``, checked with the command line's own readers (`imageio.read_image`)
before it appears under its name; a refused upload leaves nothing behind. Error messages name
files by their id, never by the server's paths.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator, Optional

from ..errors import InputError
from ..imageio import SUPPORTED_EXTENSIONS, read_image, read_labels

SAMPLE, DATA, UPLOADS = "sample", "data", "uploads"
MAX_UPLOAD_BYTES = 512 * 1024 * 1024
MAX_LISTED = 2000
CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """A file the page may offer: its id and the size shown beside it."""

    id: str
    size: int

    @property
    def label(self) -> str:
        return f"{self.id} ({self.size / 1e6:.1f} MB)" if self.size >= 100_000 else self.id


def is_image_name(name: str) -> bool:
    """True for a file name with one of the extensions the command line reads."""
    return any(name.lower().endswith(extension) for extension in SUPPORTED_EXTENSIONS)


class FileStore:
    """The roots the page may read (``sample``, ``data`` where given, ``uploads``) and the only gate to them."""

    def __init__(self, sample: Path, uploads: Path, data: Optional[Path] = None, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
        if data is not None and not Path(data).is_dir():
            raise InputError(f"--data '{data}' is not a folder; give the folder holding your images.")
        uploads.mkdir(parents=True, exist_ok=True)
        roots = {SAMPLE: sample, DATA: data, UPLOADS: uploads}
        self.roots: dict[str, Path] = {name: Path(path).resolve(strict=True) for name, path in roots.items() if path is not None}
        self.max_upload_bytes = max_upload_bytes

    # Reading

    def resolve(self, file_id: str) -> Path:
        """The real path of ``file_id``, or `InputError` when it is not a file inside its root."""
        root_name, relative = self._split(file_id)
        root = self.roots[root_name]
        candidate = root.joinpath(*relative.parts)
        try:
            real = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            raise InputError(f"'{file_id}' does not exist; choose a file from the list or upload it.") from None
        if not _inside(real, root):
            raise InputError(f"'{file_id}' leads outside the {root_name} folder; the page reads only files inside it.")
        if not real.is_file():
            raise InputError(f"'{file_id}' is not a file; choose an image file.")
        return real

    def files(self) -> list[FileEntry]:
        """Every image file the page may offer, root by root, sorted; links that lead outside a root are left out."""
        entries: list[FileEntry] = []
        for root_name, root in self.roots.items():
            for path in sorted(_walk(root)):
                if len(entries) >= MAX_LISTED:
                    return entries
                if not is_image_name(path.name):
                    continue
                file_id = f"{root_name}/{path.relative_to(root).as_posix()}"
                try:
                    real = self.resolve(file_id)
                except InputError:
                    continue
                entries.append(FileEntry(file_id, real.stat().st_size))
        return entries

    def check(self, file_id: str, labels: bool = False, name: Optional[str] = None) -> Path:
        """Resolve ``file_id`` and read it as the command line would (`read_image`, or `read_labels` for a label
        map); `InputError` with the reader's message, naming the file by its id, when it is refused."""
        path = self.resolve(file_id)
        reader = read_labels if labels else read_image
        try:
            reader(path, name or ("label map" if labels else "image"))
        except InputError as error:
            raise InputError(str(error).replace(str(path), file_id)) from None
        return path

    # Writing

    def save_upload(self, name: str, stream: BinaryIO) -> str:
        """Store an upload called ``name`` from ``stream`` in the uploads folder after the command line's checks;
        returns its file id. Nothing is left behind when it is refused."""
        clean = upload_name(name)
        file_id = f"{UPLOADS}/{clean}"
        uploads = self.roots[UPLOADS]
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=uploads))
        try:
            staged = staging / clean
            size = 0
            with staged.open("wb") as out:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise InputError(
                            f"'{clean}' is larger than the upload limit of {self.max_upload_bytes // (1024 * 1024)} MB; "
                            "put large files in the --data folder instead."
                        )
                    out.write(chunk)
            if size == 0:
                raise InputError(f"'{clean}' is empty (0 bytes); upload the image file itself.")
            try:
                read_image(staged, "image")
            except InputError as error:
                raise InputError(str(error).replace(str(staged), file_id)) from None
            os.replace(staged, uploads / clean)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return file_id

    # Helpers

    def _split(self, file_id: str) -> tuple[str, PurePosixPath]:
        text = str(file_id)
        if not text or any(ord(c) < 32 for c in text) or "\\" in text:
            raise InputError(f"'{text}' is not a file name the page accepts.")
        path = PurePosixPath(text)
        if path.is_absolute() or ".." in path.parts or len(path.parts) < 2:
            raise InputError(f"'{text}' is not inside a folder the page may read (choose from: {', '.join(self.roots)}).")
        if path.parts[0] not in self.roots:
            raise InputError(f"'{text}' is not inside a folder the page may read (choose from: {', '.join(self.roots)}).")
        return path.parts[0], PurePosixPath(*path.parts[1:])


def upload_name(name: str) -> str:
    """``name`` if it is a plain file name with a supported extension; `InputError` otherwise."""
    text = str(name or "")
    if (
        not text
        or text in (".", "..")
        or text.startswith(".")
        or "/" in text
        or "\\" in text
        or any(ord(c) < 32 for c in text)
        or len(text) > 255
    ):
        raise InputError(f"'{text}' is not a plain file name; rename the file (no folders, no leading dot) and upload it again.")
    if not is_image_name(text):
        raise InputError(f"'{text}' has an unsupported file type; JointRegSeg reads {', '.join(SUPPORTED_EXTENSIONS)}.")
    return text


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _walk(root: Path) -> Iterator[Path]:
    """Files under ``root`` without following linked folders (hidden files and folders skipped)."""
    for folder, folders, files in os.walk(root, followlinks=False):
        folders[:] = [f for f in folders if not f.startswith(".")]
        for name in files:
            if not name.startswith("."):
                yield Path(folder) / name
