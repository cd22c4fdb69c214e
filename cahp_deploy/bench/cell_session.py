"""One session bound to the feeds of one cell, callable as ``runner(i)`` to run feed ``i``.

On a GPU, ``session.run(feeds)`` copies the inputs to the device and the outputs back on every
call, and at small batches those copies can take longer than the model. With IO binding the inputs
are placed on the device once, before timing, and the outputs stay there, so the timed call is the
model alone: what a server that keeps tensors on the GPU would see.
"""

from __future__ import annotations

import numpy as np

from cahp_deploy.bench.inputs import Feed
from cahp_deploy.onnx_runtime import feed, input_dtypes


class Runner:
    """Runs one session on a fixed list of feeds; ``io_binding`` pre-places inputs on ``device``."""

    def __init__(self, session, feeds: list[Feed], device: tuple[str, int] = ("cpu", 0), io_binding: bool = False):
        self.session = session
        self.device = device
        self.io_binding = io_binding
        dtypes = input_dtypes(session)
        self.output_names = [o.name for o in session.get_outputs()]
        self._feeds = [feed(dtypes, f.arrays) for f in feeds]
        self._bindings = [self._bind(f) for f in self._feeds] if io_binding else None

    def _bind(self, arrays: dict[str, np.ndarray]):
        import onnxruntime as ort

        kind, device_id = self.device
        binding = self.session.io_binding()
        for name, array in arrays.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, kind, device_id))
        for name in self.output_names:
            binding.bind_output(name, kind, device_id)
        return binding

    def __call__(self, i: int) -> None:
        if self._bindings is None:
            self.session.run(self.output_names, self._feeds[i])
        else:
            binding = self._bindings[i]
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()

    def logits(self, i: int) -> np.ndarray:
        """The first output of feed ``i`` on the host (for checks, not for timing)."""
        if self._bindings is None:
            return np.asarray(self.session.run(self.output_names[:1], self._feeds[i])[0])
        self(i)
        return np.asarray(self._bindings[i].copy_outputs_to_cpu()[0])
