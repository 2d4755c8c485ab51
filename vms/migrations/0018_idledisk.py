from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("vms", "0017_pressure"),
    ]

    operations = [
        migrations.AddField(
            model_name="template",
            name="idle_to_disk",
            field=models.BooleanField(default=False),
        ),
        migrations.AddField(
            model_name="virtualmachine",
            name="idle_to_disk",
            field=models.BooleanField(default=False),
        ),
        migrations.AddField(
            model_name="virtualmachine",
            name="suspended_to_disk",
            field=models.BooleanField(default=False),
        ),
    ]
