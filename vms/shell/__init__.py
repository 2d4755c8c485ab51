"""Shell commands that must replace django-q2's own (listed before ``django_q`` in
INSTALLED_APPS, since the first app with a command's name provides it): ``qcluster`` would run
the cluster without the worker task guard (``vms.task_guard``), so it refuses and names
``manage.py worker``."""
