"""URL map: dashboard, accounts, API v1 (with its schema and docs), health and metrics."""

from django.contrib import admin
from django.contrib.auth.decorators import login_required
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework.routers import DefaultRouter

from accounts.api import MeView, TokenViewSet, UserViewSet
from accounts.review_api import AccountsReviewView, accounts_page
from audit.api import EventViewSet
from sandbox_site import health, metrics, views
from sandbox_site import schema as _schema  # noqa: F401 - registers the Bearer token scheme
from secretstore.api import SecretViewSet
from vms.api import (
    GroupBudgetView,
    GroupQuotaView,
    QuotaMeView,
    RequestStatusView,
    SnapshotViewSet,
    TemplateViewSet,
    UserQuotaView,
    VMViewSet,
)
from vms.host_api import HostCapacityView
from vms.network_api import EgressView, NetworkViewSet, PortForwardViewSet
from vms.pool_api import PoolsView, PoolTargetView
from vms.preview_api import PreviewLinkDetailView, PreviewLinkView
from vms.task_views import TaskListView
from vms.usage_api import (
    GroupUsageView,
    HostUsageView,
    UserUsageView,
    VMRightSizingView,
    VMUsageView,
)
from webhooks.api import WebhookViewSet

router = DefaultRouter()
router.register("tokens", TokenViewSet, basename="token")
router.register("users", UserViewSet, basename="user")
router.register("events", EventViewSet, basename="event")
router.register("vms", VMViewSet, basename="vm")
router.register("snapshots", SnapshotViewSet, basename="snapshot")
router.register("templates", TemplateViewSet, basename="template")
router.register("secrets", SecretViewSet, basename="secret")
router.register("networks", NetworkViewSet, basename="network")
router.register("webhooks", WebhookViewSet, basename="webhook")
router.register(r"vms/(?P<vm_pk>[^/.]+)/ports", PortForwardViewSet, basename="vm-port")

api_v1 = [
    path("vms/<uuid:pk>/previews/", PreviewLinkView.as_view(), name="vm-previews"),
    path(
        "vms/<uuid:pk>/previews/<str:link_id>/",
        PreviewLinkDetailView.as_view(),
        name="vm-preview-link",
    ),
    path("vms/<uuid:pk>/usage/", VMUsageView.as_view(), name="vm-usage"),
    path("vms/<uuid:pk>/rightsizing/", VMRightSizingView.as_view(), name="vm-rightsizing"),
    path("users/<int:pk>/usage/", UserUsageView.as_view(), name="user-usage"),
    path("groups/<int:pk>/usage/", GroupUsageView.as_view(), name="group-usage"),
    path("hosts/", HostCapacityView.as_view(), name="hosts"),
    path("pools/", PoolsView.as_view(), name="pools"),
    path("pools/<slug:template>/", PoolTargetView.as_view(), name="pool-target"),
    path("hosts/<str:name>/usage/", HostUsageView.as_view(), name="host-usage"),
    path("", include(router.urls)),
    path("me/", MeView.as_view(), name="me"),
    path("vms/<str:vm_pk>/egress/", EgressView.as_view(), name="vm-egress"),
    path("quotas/me/", QuotaMeView.as_view(), name="quota-me"),
    path("quotas/users/<int:pk>/", UserQuotaView.as_view(), name="quota-user"),
    path("quotas/groups/<int:pk>/", GroupQuotaView.as_view(), name="quota-group"),
    path("quotas/groups/<int:pk>/budget/", GroupBudgetView.as_view(), name="quota-group-budget"),
    path("tasks/", TaskListView.as_view(), name="tasks"),
    path("requests/<str:event_id>/", RequestStatusView.as_view(), name="request-status"),
    path("audit/accounts/", AccountsReviewView.as_view(), name="audit-accounts-api"),
    path("audit/", include("audit.urls")),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    # The page for people (logged in, else to the login page); its script is a file of its own,
    # so the Content-Security-Policy needs no inline script.
    path(
        "docs/",
        login_required(SpectacularSwaggerSplitView.as_view(url_name="schema")),
        name="docs",
    ),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("accounts/", include("accounts.urls")),
    path("audit/accounts/", accounts_page, name="audit-accounts"),
    # Console recordings: the VM domain plays them back inside the auditor area's URLs.
    path("audit/sessions/", include("vms.urls_recordings")),
    path("audit/", include("audit.urls_dashboard")),
    path("vms/", include("vms.urls")),
    path("networks/", include("vms.urls_networks")),
    path("tasks/", include("vms.urls_tasks")),
    path("secrets/", include("secretstore.urls")),
    path("webhooks/", include("webhooks.urls")),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("favicon.ico", views.favicon, name="favicon"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics_view, name="metrics"),
]

# Under /api/ errors answer JSON in the API's shape (sandbox_site/errors.py).
handler400 = "sandbox_site.errors.bad_request"
handler403 = "sandbox_site.errors.permission_denied"
handler404 = "sandbox_site.errors.page_not_found"
handler500 = "sandbox_site.errors.server_error"
