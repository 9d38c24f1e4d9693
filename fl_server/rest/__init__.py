"""The REST driver: everything HTTP, and the only package that imports Flask.

``gateway`` (who the client is), ``driver`` (the RoundDriver interface) with ``sync_driver``,
``secure_driver`` and ``async_driver``, ``service`` (their assembly), ``app`` (routes only),
``serve`` (gunicorn), and what watches them: ``metrics``, ``dashboard``, ``openapi``,
``run_report``, ``audit``, ``admin_cli``. See docs/architecture.md.
"""
