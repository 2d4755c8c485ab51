"""Signed webhooks: subscriptions to event types, delivered from the log by the workers."""
