"""The page's two HTTP routes beside trame's websocket: uploads in, output folders out.

``POST /jointregseg/upload?name=N&viewer=V`` streams the body into `files.FileStore.save_upload`
(size-capped while it arrives, checked with the command line's reader, whole or not at all) and
tells the uploading viewer the outcome through the page's state. ``GET /jointregseg/download/<n>``
sends the output folder of the n-th finished run of the page as a zip; n is a place in that list
(a non-negative whole number), never a path.
"""

from __future__ import annotations

import asyncio
import io
import zipfile
from pathlib import Path
from typing import Any

from ..errors import InputError

UPLOAD_URL = "jointregseg/upload"
DOWNLOAD_URL = "jointregseg/download"


def add_routes(wslink_server: Any, app: Any) -> None:
    """Add both routes to the aiohttp application of trame's server (``ctrl.on_server_bind``) for ``app``
    (a `server.WebApp`: its store, its finished runs, its `uploaded` and `refuse_upload` handlers)."""
    from aiohttp import web

    async def upload(request: web.Request) -> web.Response:
        viewer, name = request.query.get("viewer", ""), request.query.get("name", "")
        try:
            if app.controller.state.busy:
                raise InputError("Uploads wait until the running registration has finished.")
            file_id = await asyncio.get_running_loop().run_in_executor(None, app.store.save_upload, name, BlockingReader(request))
        except InputError as error:
            app.upload_refused(viewer, str(error))
            return web.json_response({"ok": False, "message": str(error)}, status=400)
        app.uploaded(viewer, file_id)
        return web.json_response({"ok": True, "file": file_id})

    async def download(request: web.Request) -> web.Response:
        text = request.match_info["index"]
        if not (text.isascii() and text.isdigit()) or int(text) >= len(app.finished):
            raise web.HTTPNotFound(text="No such result.")
        run = app.finished[int(text)]
        data = await asyncio.get_running_loop().run_in_executor(None, zip_folder, run.output)
        name = f"jointregseg-{run.method}-{int(text) + 1}.zip"
        return web.Response(body=data, content_type="application/zip", headers={"Content-Disposition": f'attachment; filename="{name}"'})

    wslink_server.app.router.add_post(f"/{UPLOAD_URL}", upload)
    wslink_server.app.router.add_get(f"/{DOWNLOAD_URL}/{{index}}", download)


class BlockingReader:
    """A blocking ``read(n)`` over an aiohttp request body, for `FileStore.save_upload` in a worker thread."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.loop = asyncio.get_running_loop()

    def read(self, size: int) -> bytes:
        return asyncio.run_coroutine_threadsafe(self.request.content.read(size), self.loop).result()


def zip_folder(folder: Path) -> bytes:
    """The files under ``folder`` as a zip archive (paths relative to the folder; links left out)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()
