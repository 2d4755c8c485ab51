"""Append-only triggers on the event and digest tables (see audit.db)."""

from django.db import migrations

from audit import db


class Migration(migrations.Migration):
    dependencies = [("audit", "0001_initial")]

    operations = [migrations.RunPython(db.install, db.uninstall)]
