"""The bottom layer: what every app uses and that imports no app.

Request context, compiled queries, pagination, the psycopg adapters, the logging filter, the
recurring-job helper, the request parsers, the Prometheus registry each app registers its metrics
in, declared token scopes and the permission class that asks Django's permissions. Django and DRF
are fine here; ``audit``, ``accounts``, ``vms`` and ``sandbox_site`` are not (``make lint`` holds
that).
"""
