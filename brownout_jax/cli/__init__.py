"""The ``brownout-jax`` command line: one module per command (``main`` builds the parser).

``options`` holds what several commands share (model, engine and brownout flags, and the one
flags → EngineConfig builder, also used by ``brownout-jax eval``); it imports no JAX, so
building the parser stays cheap. This package's ``__init__`` imports nothing: the eval
commands (``brownout_jax.cli.evaluate``) import ``options`` without importing ``main``.
"""
