"""Adapter uploads to the admin API (``PUT /admin/models/{name}``): the body streamed to a
temporary file in the registry, registered when complete."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .openai_types import ServingError

if TYPE_CHECKING:
    from .service import ServingService

MAX_UPLOAD_BYTES = 4 << 30


class Upload:
    """An adapter file arriving in chunks, written to a temporary file in the registry as it comes;
    :meth:`finish` registers it (slow: validation against the base model), :meth:`abort` drops it."""

    def __init__(
        self, service: ServingService, name: str, length: int | None, replace: bool, plugin_gain: float | None
    ) -> None:
        self.service, self.name, self.length, self.replace, self.plugin_gain = (
            service,
            name,
            length,
            replace,
            plugin_gain,
        )
        self.received = 0
        Path(service.config.registry).mkdir(parents=True, exist_ok=True)
        self._file = tempfile.NamedTemporaryFile(
            dir=service.config.registry, prefix=".upload-", suffix=".safetensors", delete=False
        )

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > (self.length if self.length is not None else MAX_UPLOAD_BYTES):
            raise ServingError(413, f"the adapter is over {MAX_UPLOAD_BYTES} bytes, the limit", code="too_large")
        self._file.write(chunk)

    def finish(self) -> dict:
        self._file.close()
        try:
            if self.length is not None and self.received < self.length:
                raise ServingError(
                    400, f"the body ended after {self.received} of {self.length} bytes", code="incomplete_body"
                )
            return self.service.register(self.name, self._file.name, replace=self.replace, plugin_gain=self.plugin_gain)
        finally:
            os.unlink(self._file.name)

    def abort(self) -> None:
        self._file.close()
        if os.path.exists(self._file.name):
            os.unlink(self._file.name)
