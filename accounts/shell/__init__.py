"""Shell commands that must replace Django's own (listed before ``django.contrib.auth`` in
INSTALLED_APPS, since the first app with a command's name provides it): ``changepassword``
records the change through ``accounts.commands``."""
