"""`DeviceClient`: the trainer-side handle of a pooled device (the `Device` protocol over Ray)."""
from __future__ import annotations

import numpy as np
import ray
import torch
from ray.exceptions import RayTaskError

from actors.errors import DeviceError, EnvelopeError
from actors.spec import SystemSpec

from .pool import NAMESPACE, actor_name


class DeviceClient:
    """Calls a device actor by name. Construct, then `connect()` (the only I/O) once per trial."""

    def __init__(self, name: str, client_id: str = "anonymous", namespace: str = NAMESPACE,
                 timeout_s: float = 300.0):
        self.name = name
        self.client_id = client_id
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._actor = None
        self._spec: SystemSpec | None = None

    def connect(self) -> "DeviceClient":
        try:
            self._actor = ray.get_actor(actor_name(self.name), namespace=self.namespace)
        except ValueError:
            raise DeviceError(
                f"device '{self.name}' is not running in namespace '{self.namespace}'; start it with "
                f"`physfarm devices up` or let the sweep start it"
            ) from None
        self._spec = SystemSpec(**self._call(self._actor.spec.remote()))
        return self

    @property
    def spec(self) -> SystemSpec:
        if self._spec is None:
            raise RuntimeError(f"DeviceClient('{self.name}') is not connected; call connect() first")
        return self._spec

    def _call(self, ref):
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, (EnvelopeError, DeviceError)):
                raise cause from None
            raise
        except ray.exceptions.GetTimeoutError:
            raise DeviceError(f"device '{self.name}': no answer within {self.timeout_s} s") from None

    def forward(self, x, theta) -> torch.Tensor:
        """y[B, n_outputs] for x[B, n_inputs] and theta[n_params] (float32)."""
        x = np.ascontiguousarray(x.detach().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        theta = np.ascontiguousarray(
            theta.detach().numpy() if isinstance(theta, torch.Tensor) else theta, dtype=np.float32)
        y = self._call(self._actor.forward.remote(x, theta, self.client_id))
        return torch.from_numpy(np.array(y, dtype=np.float32))  # copy: Ray's buffers are read-only

    def ideal_model(self) -> torch.nn.Module:
        return self._call(self._actor.ideal_model.remote())

    def stats(self) -> dict:
        return self._call(self._actor.stats.remote())

    def client_stats(self) -> dict:
        """This client's accounting at the device: requests, rows, wait_s, device_s."""
        return self.stats()["clients"].get(self.client_id, {"requests": 0, "rows": 0, "wait_s": 0.0,
                                                              "device_s": 0.0})
