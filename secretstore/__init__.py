"""The secrets store: values owned by a user or a role group, encrypted at rest, write-only."""
