"""Logging filter adding the current request id, channel and source IP to every record."""

from __future__ import annotations

import logging

from core import context


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = context.current()
        record.request_id = ctx.request_id
        record.channel = ctx.channel
        if ctx.source_ip:
            record.source_ip = ctx.source_ip
        return True
