"""Data: make the superuser and staff flags follow the admin role group.

Before this, a role change left the flags as they were, so a user demoted from admin kept its
superuser power while the log (``user.role_changed``) said it was gone: the role group and the
log are right, and the flags follow them. A superuser with no role group at all (made outside
the product, where the API already showed it as an admin) gets the admin role it was shown with.
"""

from django.db import migrations

ROLES = ("admin", "operator", "viewer", "auditor")


def superuser_follows_role(apps, schema_editor):
    User = apps.get_model("accounts", "User")
    Group = apps.get_model("auth", "Group")
    roleless = User.objects.filter(is_superuser=True).exclude(groups__name__in=ROLES)
    if roleless.exists():
        admin_group, _ = Group.objects.get_or_create(name="admin")
        for user in roleless:
            user.groups.add(admin_group)
    admins = User.objects.filter(groups__name="admin").values_list("pk", flat=True)
    User.objects.exclude(pk__in=admins).filter(is_superuser=True).update(
        is_superuser=False, is_staff=False
    )
    User.objects.filter(pk__in=admins).update(is_superuser=True, is_staff=True)


class Migration(migrations.Migration):
    dependencies = [("accounts", "0003_alter_user_managers")]

    operations = [migrations.RunPython(superuser_follows_role, migrations.RunPython.noop)]
