"""Host pressure (vms.pressure): priority and opt-out on templates and VMs; balloon and CPU
weight state of a VM."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("vms", "0016_pools"),
    ]

    operations = [
        migrations.AddField(
            model_name="template",
            name="pressure_opt_out",
            field=models.BooleanField(default=False),
        ),
        migrations.AddField(
            model_name="template",
            name="priority",
            field=models.CharField(
                choices=[("high", "High"), ("normal", "Normal"), ("low", "Low")],
                default="normal",
                max_length=8,
            ),
        ),
        migrations.AddField(
            model_name="virtualmachine",
            name="balloon_target_mib",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="virtualmachine",
            name="ballooned_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="virtualmachine",
            name="cpu_lowered_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="virtualmachine",
            name="cpu_weight",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="virtualmachine",
            name="pressure_opt_out",
            field=models.BooleanField(default=False),
        ),
        migrations.AddField(
            model_name="virtualmachine",
            name="priority",
            field=models.CharField(
                choices=[("high", "High"), ("normal", "Normal"), ("low", "Low")],
                default="normal",
                max_length=8,
            ),
        ),
    ]
