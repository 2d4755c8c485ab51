"""ASGI entry point: HTTP through Django (in thread lanes), websockets through Channels, and
preview hosts to the guests (``sandbox_site.preview``)."""

import os

from django.core.wsgi import get_wsgi_application

from sandbox_site.lanes import Lanes, tune_interpreter, warm_database

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sandbox_site.settings")
tune_interpreter()
django_http_app = Lanes(get_wsgi_application())
warm_database()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

from accounts.authentication import TokenAuthMiddleware  # noqa: E402
from sandbox_site.preview import PreviewRouter  # noqa: E402
from sandbox_site.proxies import TrustedProxyHeaders  # noqa: E402
from vms import consumers  # noqa: E402
from vms.exec_consumer import ExecConsumer  # noqa: E402

websocket_urlpatterns = [
    path("ws/vms/live/", consumers.VMListConsumer.as_asgi()),
    path("ws/tasks/live/", consumers.TaskLogConsumer.as_asgi()),
    path("ws/vms/<uuid:vm_id>/live/", consumers.VMLiveConsumer.as_asgi()),
    path("ws/vms/<uuid:vm_id>/console/", consumers.ConsoleConsumer.as_asgi()),
    path("ws/vms/<uuid:vm_id>/exec/", ExecConsumer.as_asgi()),
]

# Forwarded headers are believed from SANDBOX_TRUSTED_PROXIES only, here, for every serving mode.
# Preview hosts ({port}-{vm}.SANDBOX_PREVIEW_DOMAIN) go to the guest before Django or Channels
# see them: the dashboard never answers there, and its session is never read there.
application = TrustedProxyHeaders(
    PreviewRouter(
        ProtocolTypeRouter(
            {
                "http": django_http_app,
                "websocket": AllowedHostsOriginValidator(
                    AuthMiddlewareStack(TokenAuthMiddleware(URLRouter(websocket_urlpatterns)))
                ),
            }
        )
    )
)
