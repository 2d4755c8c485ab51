"""Dashboard routes of the webhooks, mounted by the project under ``/webhooks/``."""

from django.urls import path

from webhooks import views

app_name = "webhooks"

urlpatterns = [
    path("", views.webhooks_page, name="list"),
    path("<uuid:pk>/", views.detail, name="detail"),
    path("<uuid:pk>/delete/", views.delete, name="delete"),
    path("<uuid:pk>/<str:verb>/", views.action, name="action"),
]
