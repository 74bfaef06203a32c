"""An NDIF server in this process, for tests of ``remote=True`` without a network.

:class:`FakeNDIF` is nnsight's own :class:`RemoteBackend` (its client side: ``__call__``, the
push of the results into the caller's frame) with the transport replaced: the request is
serialized exactly as for the server (``RequestModel.serialize``), deserialized with this
process's own modules hidden against a *separate* model that holds the weights (the server's
copy), executed there, and only the values the request saved are pickled back. Unlike nnsight's
``remote="local"`` simulation (which runs the deserialized code against the caller's objects),
the client here may hold no weights at all (``load_model(..., remote=True)``: the meta device).
Every request's bytes up and down are logged."""

from __future__ import annotations

import linecache
from dataclasses import dataclass, field

from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.intervention.serialization import dumps, loads
from nnsight.schema.request import RequestModel
from nnsight.tracing.tracer import _saves


@dataclass
class Request:
    up: int  # bytes of the serialized request
    down: int  # bytes of the pickled saved values sent back
    saved: dict = field(repr=False, default_factory=dict)  # name -> value, as received


class FakeNDIF(RemoteBackend):
    def __init__(self, server, log: list[Request]):  # noqa: D107 - no transport to set up
        self.server, self.log, self.verbose = server, log, False

    def __call__(self, tracer):
        result = self.request(None, tracer)
        self._push(result, tracer)
        return result

    def request(self, request, tracer) -> dict:
        blob = RequestModel.serialize(tracer)
        # deserialize() registers the block's source in linecache under the caller's file name;
        # a server is another process, here it would clobber this file's real lines
        filename = tracer.info.frame.f_code.co_filename
        lines = linecache.cache.get(filename)
        hidden = LocalSimulationBackend._hide_local_modules(self)
        try:
            restored = RequestModel.deserialize(blob, self.server._remoteable_persistent_objects())
        finally:
            LocalSimulationBackend._restore(self, hidden)
            if lines is not None:
                linecache.cache[filename] = lines
            else:
                linecache.cache.pop(filename, None)
        restored.execute(restored.info.code)
        saves = _saves()
        result = {k: v for k, v in restored.info.frame.f_locals.items() if id(v) in saves}
        down = dumps(result)
        got = loads(down)
        self.log.append(Request(len(blob), len(down), got))
        return got
