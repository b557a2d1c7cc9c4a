"""What the gRPC and HTTP fronts share: the engine once it is warm, whether the server is
serving (health on both fronts), and the optional API key."""

from __future__ import annotations

import dataclasses
import hmac
import threading
from collections.abc import Callable

API_KEY_ENV = "BROWNOUT_JAX_API_KEY"


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    """A shared secret clients present as ``Authorization: Bearer KEY`` (an HTTP header or
    gRPC call metadata). Never shown: its repr hides it, so no log can print it."""

    secret: str = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if not self.secret or self.secret != self.secret.strip():
            raise ValueError("API key: empty, or with leading or trailing whitespace")

    def accepts(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant time: a timing side channel must not reveal the key byte by byte.
        return hmac.compare_digest(token.strip().encode(), self.secret.encode())


class ServingState:
    """Set by the server's life cycle (warm-up, failure, drain), read by both fronts."""

    def __init__(self, api_key: ApiKey | None = None, served_model_name: str | None = None):
        self.api_key = api_key
        self.engine = None  # set once warm-up is done
        self._served_model_name = served_model_name
        self._serving = False
        self._draining = False
        self._lock = threading.Lock()
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def model_name(self) -> str | None:
        if self._served_model_name is not None:
            return self._served_model_name
        return None if self.engine is None else self.engine.model_name

    @property
    def serving(self) -> bool:
        return self._serving

    @property
    def draining(self) -> bool:
        return self._draining

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """``listener(serving)`` now and after every change (the gRPC health service)."""
        with self._lock:
            self._listeners.append(listener)
            listener(self._serving)

    def set_serving(self, serving: bool) -> None:
        with self._lock:
            if serving and self._draining:
                return  # a draining server never serves again
            self._serving = serving
            for listener in self._listeners:
                listener(serving)

    def start_draining(self) -> None:
        self._draining = True
        self.set_serving(False)
