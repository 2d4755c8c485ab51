"""The bottom layer: what every app uses and that imports no app.

Request context, compiled queries, pagination, the psycopg adapters, the logging filter, the
recurring-job helper and the request parsers. Django and DRF are fine here; ``audit``,
``accounts``, ``vms`` and ``sandbox_site`` are not (``make lint`` holds that).
"""
