"""gRPC service (brownout.v1): server, client and generated stubs.

Installed as ``brownout_jax.serve`` (setuptools package-dir), so no generic top-level ``serve``
module lands in site-packages.
"""
