from django.urls import path

from secretstore import views

app_name = "secrets"

urlpatterns = [
    path("", views.secrets_page, name="list"),
    path("<uuid:pk>/value/", views.update, name="update"),
    path("<uuid:pk>/delete/", views.delete, name="delete"),
]
