from django.contrib.auth import views as auth_views
from django.urls import path

from accounts import views

app_name = "accounts"

urlpatterns = [
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<int:pk>/revoke/", views.revoke_token, name="revoke-token"),
    path("users/", views.users, name="users"),
    path("users/<int:pk>/", views.user_detail, name="user"),
    path("users/<int:pk>/unlock/", views.user_unlock, name="user-unlock"),
    path("users/<int:pk>/password/", views.user_password, name="user-password"),
    path("users/<int:pk>/password/off/", views.user_password_off, name="user-password-off"),
    path("users/<int:pk>/role/", views.user_role, name="user-role"),
    path("users/<int:pk>/active/", views.user_active, name="user-active"),
]
