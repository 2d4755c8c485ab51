"""Settings, read once from the environment.

Embedded defaults run everything on one machine (SQLite, the django-q2 ORM broker, the in-memory
channel layer); ``DATABASE_URL`` and ``REDIS_URL`` switch to PostgreSQL and Redis. Secrets that
are not given are generated once into ``$SANDBOX_DATA_DIR/secrets/`` so that a restart keeps
sessions, tokens and signatures valid.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from core import keyfiles

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off", ""}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {value!r}")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from exc


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from exc


DATA_DIR = Path(os.environ.get("SANDBOX_DATA_DIR", BASE_DIR / "var")).resolve()
TESTING = "pytest" in sys.modules or env_bool("SANDBOX_TESTING")
# Where `manage.py serve` listens (and what `bootstrap_admin` tells to open).
SANDBOX_HOST = os.environ.get("SANDBOX_HOST", "127.0.0.1")
SANDBOX_PORT = env_int("SANDBOX_PORT", 8000)
if not 0 < SANDBOX_PORT < 65536:
    raise ImproperlyConfigured(f"SANDBOX_PORT must be a port number, got {SANDBOX_PORT}")


# Control-plane secrets kept as versioned files (core.keyfiles; docs/security.md, "Key rotation").
SANDBOX_SECRETS_DIR = DATA_DIR / "secrets"
# The Django secret (sessions, signed values such as preview grants): DJANGO_SECRET_KEY with
# DJANGO_SECRET_KEY_FALLBACKS, else the newest version in the secrets directory with the older
# ones as fallbacks, still accepted until `manage.py retire_key django-secret` deletes them.
if os.environ.get("DJANGO_SECRET_KEY"):
    SECRET_KEY = os.environ["DJANGO_SECRET_KEY"]
    SECRET_KEY_FALLBACKS = [
        k.strip() for k in os.environ.get("DJANGO_SECRET_KEY_FALLBACKS", "").split(",") if k.strip()
    ]
else:
    _django_secrets = keyfiles.load(keyfiles.DJANGO_SECRET, SANDBOX_SECRETS_DIR, os.environ)
    SECRET_KEY, SECRET_KEY_FALLBACKS = keyfiles.current_and_older(_django_secrets)
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = [
    h.strip() for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")
]
if TESTING:
    ALLOWED_HOSTS += ["testserver"]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in os.environ.get("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()
]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    # Before django.contrib.auth: its changepassword (recorded) replaces Django's.
    "accounts.shell",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    # Before django_q: its qcluster (refused: no task guard) replaces django-q2's.
    "vms.shell",
    "django_q",
    "audit",
    "accounts",
    "secretstore",
    "vms",
    "webhooks",
    # The site itself (top layer): its `serve` command.
    "sandbox_site",
]

MIDDLEWARE = [
    "sandbox_site.middleware.RequestContextMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    # Before WhiteNoise, so that static files carry it too (security headers on every response).
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "sandbox_site.middleware.EventStoreUnavailableMiddleware",
]

ROOT_URLCONF = "sandbox_site.urls"
WSGI_APPLICATION = None
ASGI_APPLICATION = "sandbox_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "accounts.context_processors.roles",
                "vms.context_processors.vm_policy",
            ],
            # ``|when``: every time label on every page, in UTC with a toggle to local time.
            "builtins": ["core.templatetags.times"],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    # conn_max_age=0 with a pool: a request borrows a connection and gives it back, so idle
    # threads (and the executor threads of websocket consumers) hold no PostgreSQL backend.
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        # Server-side binding lets psycopg prepare the hot statements (the event store's
        # appends) after a few uses instead of parsing and planning them every time.
        options = DATABASES["default"].setdefault("OPTIONS", {})
        options["server_side_binding"] = True
        options["pool"] = {
            # `serve` raises the minimum of web processes to their lanes' threads.
            "min_size": env_int("SANDBOX_DB_POOL_MIN", 2),
            # Each web thread holds a connection for its request: both lanes' threads, and a
            # few for the process's other work (the live-update follower).
            # Each web thread holds a connection for its request, and websocket consumers
            # borrow some for their database work.
            "max_size": env_int("SANDBOX_DB_POOL_MAX", 24),
            "timeout": 10,
        }
        # Statements run this often are prepared (psycopg's automatic preparation). Behind a
        # pooler in transaction mode (PgBouncer) prepared statements break: set it to "off".
        prepare = os.environ.get("SANDBOX_PG_PREPARE_THRESHOLD", "5")
        options["prepare_threshold"] = (
            None if prepare.lower() in ("off", "none", "") else int(prepare)
        )
        # The event store's lock wait, once per session (audit.store only re-sets it when the
        # setting differs at run time): appends then send a single, preparable LOCK statement.
        options["options"] = (
            options.get("options", "")
            + f" -c lock_timeout={env_int('SANDBOX_EVENT_LOCK_TIMEOUT_MS', 5000)}"
        ).strip()
else:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(os.environ.get("SANDBOX_SQLITE_PATH", DATA_DIR / "sandbox.sqlite3")),
            # IMMEDIATE: a write transaction takes SQLite's write lock at BEGIN, so appends are
            # serialized without lock upgrades that deadlock; WAL lets readers run meanwhile.
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # A file (threads and worker processes share it), one per test run.
            "TEST": {"NAME": str(DATA_DIR / f"test-{os.getpid()}.sqlite3")},
        }
    }
DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
# Two roles on PostgreSQL (docs/operations.md, "Database roles"): the product runs as
# DATABASE_URL's role, which may only read and add to the audit tables; `migrate` logs in as the
# schema owner of DATABASE_OWNER_URL (same database) and then grants SANDBOX_DB_RUNTIME_ROLE
# (default: DATABASE_URL's user) its privileges again (audit.roles).
DATABASE_OWNER_URL = os.environ.get("DATABASE_OWNER_URL", "")
SANDBOX_DB_OWNER: dict[str, str] = {}
if DATABASE_OWNER_URL:
    _owner = dj_database_url.parse(DATABASE_OWNER_URL)
    _where = ("ENGINE", "NAME", "HOST", "PORT")
    _same = [_owner.get(k) for k in _where] == [DATABASES["default"].get(k) for k in _where]
    if _owner["ENGINE"] != "django.db.backends.postgresql" or not _same:
        raise ImproperlyConfigured(
            "DATABASE_OWNER_URL must name the PostgreSQL database of DATABASE_URL, as its owner"
        )
    SANDBOX_DB_OWNER = {k: str(_owner.get(k) or "") for k in ("NAME", "USER", "PASSWORD")}
SANDBOX_DB_RUNTIME_ROLE = os.environ.get("SANDBOX_DB_RUNTIME_ROLE") or (
    DATABASES["default"].get("USER", "") if DATABASE_OWNER_URL else ""
)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# How long an append waits for the event store lock before the action is refused (503).
SANDBOX_EVENT_LOCK_TIMEOUT_MS = env_int("SANDBOX_EVENT_LOCK_TIMEOUT_MS", 5000)

# --- Redis: channel layer and task broker -----------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [REDIS_URL],
                "prefix": os.environ.get("SANDBOX_REDIS_PREFIX", "sbx"),
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
# Where the one reader of each VM's serial console runs (vms/console.py): in the worker's main
# process, for every web process joined by Redis; or in the (single) web process.
SANDBOX_CONSOLE_RELAY = os.environ.get("SANDBOX_CONSOLE_RELAY", "worker" if REDIS_URL else "web")
if SANDBOX_CONSOLE_RELAY not in {"worker", "web"} or (
    SANDBOX_CONSOLE_RELAY == "worker" and not REDIS_URL
):
    raise ImproperlyConfigured(
        "SANDBOX_CONSOLE_RELAY must be web, or worker (which needs REDIS_URL), got "
        f"{SANDBOX_CONSOLE_RELAY!r}"
    )

Q_CLUSTER: dict[str, object] = {
    "name": os.environ.get("SANDBOX_QUEUE", "sandbox"),
    "workers": env_int("SANDBOX_WORKERS", 2),
    # timeout below retry, finite attempts: a long task is never delivered twice while running.
    "timeout": env_int("SANDBOX_TASK_TIMEOUT", 600),
    "retry": env_int("SANDBOX_TASK_TIMEOUT", 600) + 60,
    "max_attempts": 3,
    "ack_failures": True,
    "catch_up": False,
    "label": "Tasks",
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"
# The worker cluster sends itself a heartbeat task this often; /readyz is not ready when no
# worker took one for SANDBOX_WORKER_STALE_S (0: no worker check, e.g. a web tier without one).
SANDBOX_WORKER_HEARTBEAT_S = env_int("SANDBOX_WORKER_HEARTBEAT_S", 10)
SANDBOX_WORKER_STALE_S = env_int("SANDBOX_WORKER_STALE_S", 90)
# The worker runs only the product's own tasks (vms/task_guard.py); functions named here, from
# the environment (never from the database), are allowed too: for tests that need a long task.
SANDBOX_WORKER_EXTRA_TASKS = [
    t.strip() for t in os.environ.get("SANDBOX_WORKER_EXTRA_TASKS", "").split(",") if t.strip()
]

# --- Auth -------------------------------------------------------------------------------------
AUTH_USER_MODEL = "accounts.User"
AUTHENTICATION_BACKENDS = ["accounts.backends.LockoutModelBackend"]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
if TESTING:
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Lockout: this many failed logins for one username within the window locks it for LOCKOUT_S.
SANDBOX_LOCKOUT_THRESHOLD = env_int("SANDBOX_LOCKOUT_THRESHOLD", 5)
SANDBOX_LOCKOUT_WINDOW_S = env_int("SANDBOX_LOCKOUT_WINDOW_S", 900)
SANDBOX_LOCKOUT_S = env_int("SANDBOX_LOCKOUT_S", 900)
# Failed logins per source address: this many within the window refuse the address for a window,
# before any password is hashed (accounts.throttle; counters in the cache below).
SANDBOX_LOGIN_SOURCE_FAILURES = env_int("SANDBOX_LOGIN_SOURCE_FAILURES", 20)
SANDBOX_LOGIN_SOURCE_WINDOW_S = env_int("SANDBOX_LOGIN_SOURCE_WINDOW_S", 300)
# IPv6 sources are counted by network of this many bits (a /64 is one holder's).
SANDBOX_LOGIN_SOURCE_IPV6_PREFIX = env_int("SANDBOX_LOGIN_SOURCE_IPV6_PREFIX", 64)

# The cache holds counters that every web process must share (login throttling): Redis when
# there is one (several web processes), else this process's memory (one web process).
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": os.environ.get("SANDBOX_REDIS_PREFIX", "sbx") + "-cache",
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# API token peppers, by version: tokens keep the version they were hashed with, so a new pepper
# can be added (and made current) without invalidating existing tokens; a token hashed with an
# older one is re-hashed with the current one at its next use. Files token_pepper_v<N> in the
# secrets directory, each overridden by SANDBOX_TOKEN_PEPPER_V<N>; the newest is current.
SANDBOX_TOKEN_PEPPERS = keyfiles.load(keyfiles.TOKEN_PEPPER, SANDBOX_SECRETS_DIR, os.environ)
SANDBOX_TOKEN_PEPPER_CURRENT = max(SANDBOX_TOKEN_PEPPERS)
SANDBOX_TOKEN_MAX_DAYS = env_int("SANDBOX_TOKEN_MAX_DAYS", 365)

# Keys for HMAC-SHA256 signed digests over event ranges (when SANDBOX_DIGEST_ALGORITHM is
# hmac-sha256): files digest_hmac_<N>, hmac-1 overridden by SANDBOX_DIGEST_HMAC_KEY; the newest
# signs.
_hmac_versions = keyfiles.load(keyfiles.DIGEST_HMAC, SANDBOX_SECRETS_DIR, os.environ)
SANDBOX_DIGEST_HMAC_KEYS = {keyfiles.DIGEST_HMAC.key_id(v): k for v, k in _hmac_versions.items()}
SANDBOX_DIGEST_HMAC_CURRENT = keyfiles.DIGEST_HMAC.key_id(max(_hmac_versions))

# The secrets store (secretstore.crypto): "id:base64key,..." of 32-byte AES-GCM keys, the first
# current, the others readable until removed (retired); unset, one key generated once into the
# data dir. Its audit fingerprints use a key of their own.
SANDBOX_SECRETS_KEYS = os.environ.get("SANDBOX_SECRETS_KEYS") or (
    "local-1:" + keyfiles.ensure(SANDBOX_SECRETS_DIR / "secrets_key_local_1", 32)
)
SANDBOX_SECRETS_HMAC_KEY = os.environ.get("SANDBOX_SECRETS_HMAC_KEY") or keyfiles.ensure(
    SANDBOX_SECRETS_DIR / "secrets_hmac"
)
SANDBOX_SECRET_MAX_BYTES = env_int("SANDBOX_SECRET_MAX_BYTES", 65536)

# --- Webhooks (docs/webhooks.md) ---------------------------------------------------------------
# One attempt's limit (connect, send, each read; the answer's few KiB are read by then).
SANDBOX_WEBHOOK_TIMEOUT_S = env_float("SANDBOX_WEBHOOK_TIMEOUT_S", 10.0)
# Attempts per delivery, and the back-off between them: base * 2^(n-1), capped, jittered.
SANDBOX_WEBHOOK_MAX_ATTEMPTS = env_int("SANDBOX_WEBHOOK_MAX_ATTEMPTS", 8)
SANDBOX_WEBHOOK_BACKOFF_BASE_S = env_float("SANDBOX_WEBHOOK_BACKOFF_BASE_S", 15.0)
SANDBOX_WEBHOOK_BACKOFF_MAX_S = env_float("SANDBOX_WEBHOOK_BACKOFF_MAX_S", 3600.0)
# Failed deliveries (out of attempts) in a row that disable a subscription.
SANDBOX_WEBHOOK_DISABLE_AFTER = env_int("SANDBOX_WEBHOOK_DISABLE_AFTER", 5)
# Loopback and private targets for every subscription (else per subscription, by an admin).
SANDBOX_WEBHOOK_ALLOW_PRIVATE = env_bool("SANDBOX_WEBHOOK_ALLOW_PRIVATE", False)
SANDBOX_WEBHOOK_RETENTION_DAYS = env_int("SANDBOX_WEBHOOK_RETENTION_DAYS", 14)
# How long a rotated-out secret still signs (a second v1 in the signature header).
SANDBOX_WEBHOOK_SECRET_GRACE_S = env_int("SANDBOX_WEBHOOK_SECRET_GRACE_S", 86400)
SANDBOX_WEBHOOK_CONCURRENCY = env_int("SANDBOX_WEBHOOK_CONCURRENCY", 4)
SANDBOX_WEBHOOK_MAX_PER_USER = env_int("SANDBOX_WEBHOOK_MAX_PER_USER", 20)
# How long one pump task runs before it hands over to the next (the worker starts another).
SANDBOX_WEBHOOK_PUMP_S = env_float("SANDBOX_WEBHOOK_PUMP_S", 30.0)
for _name in (
    "SANDBOX_WEBHOOK_TIMEOUT_S",
    "SANDBOX_WEBHOOK_BACKOFF_BASE_S",
    "SANDBOX_WEBHOOK_PUMP_S",
):
    if not globals()[_name] > 0:
        raise ImproperlyConfigured(f"{_name} must be above 0")
for _name in ("SANDBOX_WEBHOOK_MAX_ATTEMPTS", "SANDBOX_WEBHOOK_DISABLE_AFTER",
              "SANDBOX_WEBHOOK_CONCURRENCY", "SANDBOX_WEBHOOK_RETENTION_DAYS"):  # fmt: skip
    if globals()[_name] < 1:
        raise ImproperlyConfigured(f"{_name} must be 1 or more")

# --- API --------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # A token's own limits (read-only, scopes, addresses, expiry) are applied by
    # TokenAuthentication to every operation from its view's token_scopes (accounts.scopes),
    # so a view's own permission_classes cannot drop them.
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON with a nesting limit (core/parsers.py); forms as DRF has them.
    "DEFAULT_PARSER_CLASSES": [
        "core.parsers.DepthLimitedJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "accounts.schema.ScopedAutoSchema",
    "DEFAULT_FILTER_BACKENDS": ["core.pagination.FilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "core.pagination.Pagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "sandbox_site.api.exception_handler",
    # No ?format= override: the API speaks JSON (the browsable page by Accept), and "format" is
    # a filter of its own (audit exports), which the override turned into a 404.
    "URL_FORMAT_OVERRIDE": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "MicroVM Sandbox API",
    "DESCRIPTION": "Create, run, snapshot and audit hardware-isolated microVM sandboxes.",
    "VERSION": "1.0.0",
    # One name for the egress policies (a VM's egress, a network's default_egress).
    "ENUM_NAME_OVERRIDES": {
        "EgressEnum": "vms.models.EGRESS_CHOICES",
        "PriorityEnum": "vms.models.PRIORITY_CHOICES",
    },
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SCHEMA_PATH_PREFIX": "/api/v1",
    # The schema and its page for signed-in callers only; Bearer auth and the error answers
    # documented (sandbox_site/schema.py).
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "sandbox_site.schema.add_error_responses",
    ],
}

# --- Static files, i18n ----------------------------------------------------------------------
STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
# Serve straight from static/ too, so `make run` needs no collectstatic step.
WHITENOISE_USE_FINDERS = True
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"

# --- Logging: one JSON object per line, with the request id of the request being served -----
LOG_LEVEL = os.environ.get("SANDBOX_LOG_LEVEL", "INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "core.logging.ContextFilter"}},
    "formatters": {
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            "timestamp": False,
            "datefmt": "%Y-%m-%dT%H:%M:%S%z",
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "filters": ["context"],
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        "django.request": {"level": "ERROR"},
        # httpx logs each request at INFO: the preview proxy's requests are the guests' business.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}

# --- The product ------------------------------------------------------------------------------
SANDBOX_HYPERVISOR = os.environ.get("SANDBOX_HYPERVISOR", "auto")
if SANDBOX_HYPERVISOR not in {"auto", "cloud-hypervisor", "qemu"}:
    raise ImproperlyConfigured(
        f"SANDBOX_HYPERVISOR must be auto, cloud-hypervisor or qemu, got {SANDBOX_HYPERVISOR!r}"
    )
SANDBOX_RUNTIME_DIR = Path(os.environ.get("SANDBOX_RUNTIME_DIR", "/run/microvm-sandbox"))
# Jailed VMMs (docs/security.md, "Jailed VMMs"): auto = on when the worker runs as root (the
# launcher needs root), on = refuse to start a VMM unjailed, off = debugging only (every VMM
# start logs a warning and /readyz says so).
SANDBOX_JAIL = os.environ.get("SANDBOX_JAIL", "auto").strip().lower()
if SANDBOX_JAIL not in {"auto", "on", "off"}:
    raise ImproperlyConfigured(f"SANDBOX_JAIL must be auto, on or off, got {SANDBOX_JAIL!r}")
SANDBOX_JAIL_UID_BASE = env_int("SANDBOX_JAIL_UID_BASE", 100000)  # VM n's VMM runs as base + n
SANDBOX_JAIL_UID_COUNT = env_int("SANDBOX_JAIL_UID_COUNT", 10000)
SANDBOX_JAIL_DIR = Path(os.environ.get("SANDBOX_JAIL_DIR", "/run/microvm-sandbox-jail"))
SANDBOX_JAIL_CGROUP = os.environ.get("SANDBOX_JAIL_CGROUP", "microvm-sandbox")
SANDBOX_JAIL_MEMORY_MARGIN_MIB = env_int("SANDBOX_JAIL_MEMORY_MARGIN_MIB", 256)
if SANDBOX_JAIL_UID_BASE < 1000 or SANDBOX_JAIL_UID_COUNT < 1:
    raise ImproperlyConfigured("SANDBOX_JAIL_UID_BASE must be >= 1000, SANDBOX_JAIL_UID_COUNT >= 1")
# Audit retention in calendar years (seven years is not 7 x 365 days); see docs/audit-exports.md.
if "SANDBOX_AUDIT_RETENTION_DAYS" in os.environ:
    raise ImproperlyConfigured(
        "SANDBOX_AUDIT_RETENTION_DAYS is replaced by SANDBOX_AUDIT_RETENTION_YEARS (calendar years)"
    )
SANDBOX_AUDIT_RETENTION_YEARS = env_int("SANDBOX_AUDIT_RETENTION_YEARS", 7)
if SANDBOX_AUDIT_RETENTION_YEARS < 1:
    raise ImproperlyConfigured("SANDBOX_AUDIT_RETENTION_YEARS must be at least 1")

# --- VMs: system limits, default quotas, identity, snapshots ----------------------------------
SANDBOX_MAX_VMS = env_int("SANDBOX_MAX_VMS", 50)  # live VMs on this installation
SANDBOX_MAX_VCPUS_PER_VM = env_int("SANDBOX_MAX_VCPUS_PER_VM", 8)
SANDBOX_MAX_MEMORY_MIB_PER_VM = env_int("SANDBOX_MAX_MEMORY_MIB_PER_VM", 16384)
SANDBOX_MAX_DISK_MIB_PER_VM = env_int("SANDBOX_MAX_DISK_MIB_PER_VM", 65536)
# Host capacity (vms.capacity, docs/resources.md): vCPUs committed per host CPU, memory committed
# per MiB of host memory (after the reserve), and the memory kept for the host itself.
SANDBOX_CPU_OVERCOMMIT = env_float("SANDBOX_CPU_OVERCOMMIT", 4.0)
SANDBOX_MEMORY_OVERCOMMIT = env_float("SANDBOX_MEMORY_OVERCOMMIT", 1.0)
SANDBOX_HOST_RESERVED_MEMORY_MIB = env_int("SANDBOX_HOST_RESERVED_MEMORY_MIB", 512)
if SANDBOX_CPU_OVERCOMMIT <= 0 or SANDBOX_MEMORY_OVERCOMMIT <= 0:
    raise ImproperlyConfigured("SANDBOX_CPU_OVERCOMMIT and SANDBOX_MEMORY_OVERCOMMIT must be > 0")
if SANDBOX_HOST_RESERVED_MEMORY_MIB < 0:
    raise ImproperlyConfigured("SANDBOX_HOST_RESERVED_MEMORY_MIB must be >= 0")
# Host pressure (vms.pressure, docs/resources.md "Priorities under pressure"): the control loop
# looks every SANDBOX_PRESSURE_PERIOD_S. The host is under memory pressure when MemAvailable is
# below SANDBOX_PRESSURE_MEM_AVAILABLE_MIB or memory PSI "some avg10" is above
# SANDBOX_PRESSURE_MEM_PSI (where the kernel has /proc/pressure); it is calm again when both are
# past their release values (hysteresis). A balloon takes SANDBOX_PRESSURE_BALLOON_FRACTION of a
# VM's memory, leaving it at least SANDBOX_PRESSURE_MIN_GUEST_MIB, and stays at least
# SANDBOX_PRESSURE_HOLD_S; pressure that outlasts the low-priority VMs' balloons by
# SANDBOX_PRESSURE_ESCALATE_S reaches normal-priority VMs. High-priority VMs are never ballooned.
SANDBOX_PRESSURE_ENABLED = env_bool("SANDBOX_PRESSURE_ENABLED", True)
SANDBOX_PRESSURE_PERIOD_S = env_float("SANDBOX_PRESSURE_PERIOD_S", 2.0)
SANDBOX_PRESSURE_MEM_AVAILABLE_MIB = env_int("SANDBOX_PRESSURE_MEM_AVAILABLE_MIB", 1024)
SANDBOX_PRESSURE_MEM_PSI = env_float("SANDBOX_PRESSURE_MEM_PSI", 10.0)
SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB = env_int("SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB", 2048)
SANDBOX_PRESSURE_RELEASE_PSI = env_float("SANDBOX_PRESSURE_RELEASE_PSI", 1.0)
SANDBOX_PRESSURE_BALLOON_FRACTION = env_float("SANDBOX_PRESSURE_BALLOON_FRACTION", 0.5)
SANDBOX_PRESSURE_MIN_GUEST_MIB = env_int("SANDBOX_PRESSURE_MIN_GUEST_MIB", 128)
SANDBOX_PRESSURE_HOLD_S = env_float("SANDBOX_PRESSURE_HOLD_S", 60.0)
SANDBOX_PRESSURE_ESCALATE_S = env_float("SANDBOX_PRESSURE_ESCALATE_S", 30.0)
# CPU pressure: PSI "some avg10" of /proc/pressure/cpu above SANDBOX_PRESSURE_CPU_PSI lowers the
# CPU weight of low-priority VMs' VMM cgroups to SANDBOX_PRESSURE_CPU_WEIGHT (cgroup v2 scale; a
# VM's own is 100 per vCPU); at or below SANDBOX_PRESSURE_RELEASE_CPU_PSI it is set back.
SANDBOX_PRESSURE_CPU_PSI = env_float("SANDBOX_PRESSURE_CPU_PSI", 50.0)
SANDBOX_PRESSURE_RELEASE_CPU_PSI = env_float("SANDBOX_PRESSURE_RELEASE_CPU_PSI", 20.0)
SANDBOX_PRESSURE_CPU_WEIGHT = env_int("SANDBOX_PRESSURE_CPU_WEIGHT", 10)
if not 1 <= SANDBOX_PRESSURE_CPU_WEIGHT <= 10000:
    raise ImproperlyConfigured("SANDBOX_PRESSURE_CPU_WEIGHT must be 1 to 10000")
if not 0 < SANDBOX_PRESSURE_BALLOON_FRACTION < 1:
    raise ImproperlyConfigured("SANDBOX_PRESSURE_BALLOON_FRACTION must be between 0 and 1")
if SANDBOX_PRESSURE_PERIOD_S <= 0 or SANDBOX_PRESSURE_MIN_GUEST_MIB < 64:
    raise ImproperlyConfigured(
        "SANDBOX_PRESSURE_PERIOD_S must be > 0 and SANDBOX_PRESSURE_MIN_GUEST_MIB >= 64"
    )
if (
    SANDBOX_PRESSURE_RELEASE_AVAILABLE_MIB < SANDBOX_PRESSURE_MEM_AVAILABLE_MIB
    or SANDBOX_PRESSURE_RELEASE_PSI > SANDBOX_PRESSURE_MEM_PSI
    or SANDBOX_PRESSURE_RELEASE_CPU_PSI > SANDBOX_PRESSURE_CPU_PSI
):
    raise ImproperlyConfigured(
        "the pressure release values must be past the pressure thresholds (hysteresis)"
    )
SANDBOX_DEFAULT_QUOTA = {
    "vms": env_int("SANDBOX_QUOTA_VMS", 10),
    "vcpus": env_int("SANDBOX_QUOTA_VCPUS", 16),
    "memory_mib": env_int("SANDBOX_QUOTA_MEMORY_MIB", 16384),
    "disk_mib": env_int("SANDBOX_QUOTA_DISK_MIB", 102400),
    "snapshots": env_int("SANDBOX_QUOTA_SNAPSHOTS", 20),
}
# --- Sandbox networking (docs/networking.md, docs/operations.md) ------------------------------
# auto: on when this process may create network namespaces (root or CAP_NET_ADMIN) and `ip` and
# `nft` exist (vms.netconfig.networking_enabled); off: VMs get no NIC, as before.
# Under the tests "off" unless asked for: a test that plugs NICs names a namespace of its own,
# never the host's (see tests/vms/test_network_worker.py).
SANDBOX_NETWORKING = os.environ.get("SANDBOX_NETWORKING", "off" if TESTING else "auto")
if SANDBOX_NETWORKING not in {"auto", "on", "off"}:
    raise ImproperlyConfigured(
        f"SANDBOX_NETWORKING must be auto, on or off, got {SANDBOX_NETWORKING!r}"
    )
SANDBOX_NETNS = os.environ.get("SANDBOX_NETNS", "sandbox")
SANDBOX_NET_HOST_LINK = os.environ.get("SANDBOX_NET_HOST_LINK", "10.254.0.0/30")
# The interface that `internet` egress leaves by, inside the product namespace ("": none).
SANDBOX_NET_UPLINK = os.environ.get("SANDBOX_NET_UPLINK", "")
# The default network (created after migrate from these, once): subnet, bridge, host ports.
SANDBOX_NETWORK_CIDR = os.environ.get("SANDBOX_NETWORK_CIDR", "10.250.0.0/24")
SANDBOX_NETWORK_BRIDGE = os.environ.get("SANDBOX_NETWORK_BRIDGE", "chbr0")
SANDBOX_NETWORK_PORTS = os.environ.get("SANDBOX_NETWORK_PORTS", "10000-20000")
SANDBOX_DEFAULT_EGRESS = os.environ.get(
    "SANDBOX_DEFAULT_EGRESS", "internet" if SANDBOX_NET_UPLINK else "none"
)
if SANDBOX_DEFAULT_EGRESS not in {"none", "allow-list", "internet"}:
    raise ImproperlyConfigured(
        "SANDBOX_DEFAULT_EGRESS must be none, allow-list or internet, "
        f"got {SANDBOX_DEFAULT_EGRESS!r}"
    )
SANDBOX_NETNS_KEEP = env_bool("SANDBOX_NETNS_KEEP", True)  # leave the namespace at stop
# Where the worker listens for port forwards on the host's side.
SANDBOX_FORWARD_BIND = os.environ.get("SANDBOX_FORWARD_BIND", "127.0.0.1")
# Egress evidence: one net.egress_refused / net.dns_lookups per VM per period, bounded rows.
SANDBOX_NET_EVIDENCE_PERIOD_S = env_int("SANDBOX_NET_EVIDENCE_PERIOD_S", 60)
SANDBOX_NET_EVIDENCE_MAX_ROWS = env_int("SANDBOX_NET_EVIDENCE_MAX_ROWS", 100)
SANDBOX_EGRESS_ALLOW_MAX = env_int("SANDBOX_EGRESS_ALLOW_MAX", 64)  # entries of an allow list
SANDBOX_NET_MAX_FORWARDS_PER_VM = env_int("SANDBOX_NET_MAX_FORWARDS_PER_VM", 32)
if SANDBOX_NET_MAX_FORWARDS_PER_VM < 0:
    raise ImproperlyConfigured("SANDBOX_NET_MAX_FORWARDS_PER_VM must be 0 (none) or more")
SANDBOX_TEMPLATES_FILE = os.environ.get("SANDBOX_TEMPLATES_FILE", "")
SANDBOX_SNAPSHOT_DIR = Path(os.environ.get("SANDBOX_SNAPSHOT_DIR", DATA_DIR / "snapshots"))
SANDBOX_CONSOLE_DIR = Path(os.environ.get("SANDBOX_CONSOLE_DIR", DATA_DIR / "console"))
SANDBOX_VM_DATA_DIR = Path(os.environ.get("SANDBOX_VM_DATA_DIR", DATA_DIR / "vms"))
SANDBOX_SNAPSHOT_KEEP_LAST = env_int("SANDBOX_SNAPSHOT_KEEP_LAST", 10)  # per VM; 0: no limit
SANDBOX_SNAPSHOT_MAX_AGE_DAYS = env_int("SANDBOX_SNAPSHOT_MAX_AGE_DAYS", 30)  # 0: no limit
# Exec events always hold sizes and SHA-256 of the output; the output itself only if asked.
SANDBOX_EXEC_RECORD_OUTPUT = env_bool("SANDBOX_EXEC_RECORD_OUTPUT", False)
SANDBOX_EXEC_MAX_TIMEOUT_S = env_int("SANDBOX_EXEC_MAX_TIMEOUT_S", 600)
# Longest a file transfer to or from a guest may take (the agent gives up at this deadline).
# With the exec timeout, it bounds how long a guest request may wait for its outcome: the
# reconciler settles one left without an outcome beyond it (its web process died) as failed.
SANDBOX_GUEST_TRANSFER_TIMEOUT_S = env_int("SANDBOX_GUEST_TRANSFER_TIMEOUT_S", 300)
# Largest file upload to a guest, in bytes: 413 beyond it, before more is spooled to disk.
SANDBOX_UPLOAD_MAX_BYTES = env_int("SANDBOX_UPLOAD_MAX_BYTES", 2 << 30)
# Bytes of each stream (stdout, stderr) an HTTP exec returns; the rest is counted, not kept
# (the exec websocket streams all of it).
SANDBOX_EXEC_OUTPUT_LIMIT = env_int("SANDBOX_EXEC_OUTPUT_LIMIT", 1 << 20)
if SANDBOX_EXEC_OUTPUT_LIMIT < 0:
    raise ImproperlyConfigured("SANDBOX_EXEC_OUTPUT_LIMIT must be 0 or more bytes")
SANDBOX_STOP_GRACE_S = env_int("SANDBOX_STOP_GRACE_S", 20)
# The longest lifetime a VM may be given, at create or later (seconds from then; vms.lifetimes).
SANDBOX_VM_LIFETIME_MAX_S = env_int("SANDBOX_VM_LIFETIME_MAX_S", 7 * 24 * 3600)
if SANDBOX_VM_LIFETIME_MAX_S < 1:
    raise ImproperlyConfigured("SANDBOX_VM_LIFETIME_MAX_S must be 1 second or more")
# When the stop or destroy a lifetime's end asked for fails, it is asked again this much later.
SANDBOX_LIFETIME_RETRY_S = env_int("SANDBOX_LIFETIME_RETRY_S", 60)
if SANDBOX_LIFETIME_RETRY_S < 1:
    raise ImproperlyConfigured("SANDBOX_LIFETIME_RETRY_S must be 1 second or more")
# The most VMs one fork may make (POST /api/v1/vms/{id}/fork/, vms.commands.fork).
SANDBOX_FORK_MAX = env_int("SANDBOX_FORK_MAX", 10)
if SANDBOX_FORK_MAX < 1:
    raise ImproperlyConfigured("SANDBOX_FORK_MAX must be 1 or more")
# The idle policy's bounds (vms.idle): an idle timeout is 1 to this many seconds.
SANDBOX_IDLE_TIMEOUT_MAX_S = env_int("SANDBOX_IDLE_TIMEOUT_MAX_S", 7 * 24 * 3600)

# Warm pools (issue 16; docs/vms.md "Warm pools"): VMs restored from a template's saved state
# and kept ready for creates. SANDBOX_POOLS: each template's target, "name=N,name=N" (an admin
# changes it through PUT /api/v1/pools/{template}/); none by default, so a laptop keeps no pool.
# SANDBOX_POOL_BUDGET_MIB: the guest memory all pool members together may take (a system budget,
# never a user's quota). SANDBOX_POOL_RUNNING: keep members running instead of paused.


def _pool_targets(raw: str) -> dict[str, int]:
    targets: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit():
            raise ImproperlyConfigured(f"SANDBOX_POOLS: {item!r} is not template=count")
        targets[name.strip()] = int(value)
    return targets


SANDBOX_POOLS = _pool_targets(os.environ.get("SANDBOX_POOLS", ""))
SANDBOX_POOL_BUDGET_MIB = env_int("SANDBOX_POOL_BUDGET_MIB", 2048)
if SANDBOX_POOL_BUDGET_MIB < 0:
    raise ImproperlyConfigured("SANDBOX_POOL_BUDGET_MIB must be 0 or more")
SANDBOX_POOL_RUNNING = env_bool("SANDBOX_POOL_RUNNING", False)

# --- Signed digests and audit exports (issue 6; see docs/audit-exports.md) --------------------
# New digests are signed with this algorithm; digests of either kind stay verifiable.
SANDBOX_DIGEST_ALGORITHM = os.environ.get("SANDBOX_DIGEST_ALGORITHM", "ed25519")
if SANDBOX_DIGEST_ALGORITHM not in {"ed25519", "hmac-sha256"}:
    raise ImproperlyConfigured(
        f"SANDBOX_DIGEST_ALGORITHM must be ed25519 or hmac-sha256, got {SANDBOX_DIGEST_ALGORITHM!r}"
    )
# Ed25519 keys: "id:base64-seed,..." from the environment, else PEM files <id>.pem in the key
# directory (the current one generated there once); retired public keys as <id>.pub.pem there
# or "id:base64-public,..." in SANDBOX_DIGEST_ED25519_PUBLIC_KEYS. Keys load lazily (audit.keys).
# Empty: the newest ed25519-<N> private key in the key directory (`manage.py rotate_key
# digest-key` makes the next one), else ed25519-1 (audit.keys.current_key_id).
SANDBOX_DIGEST_ED25519_CURRENT = os.environ.get("SANDBOX_DIGEST_ED25519_CURRENT", "")
SANDBOX_DIGEST_ED25519_KEYS = os.environ.get("SANDBOX_DIGEST_ED25519_KEYS", "")
# Keys signed by no trusted key (another host's own key) are trusted only when their SHA-256
# fingerprints are pinned here ("fp,fp,..."); the database's key history never vouches alone.
SANDBOX_DIGEST_TRUSTED_FINGERPRINTS = os.environ.get("SANDBOX_DIGEST_TRUSTED_FINGERPRINTS", "")
# Every digest is copied, as it is made, to a sink outside the database: by default a directory
# of write-once files (give it its own mount or a WORM store); or a class "module.Class" with
# write(entry) and read() (see audit.sink). Verification compares the database with it.
SANDBOX_DIGEST_SINK_DIR = Path(
    os.environ.get("SANDBOX_DIGEST_SINK_DIR", DATA_DIR / "audit-digest-sink")
)
SANDBOX_DIGEST_SINK_CLASS = os.environ.get("SANDBOX_DIGEST_SINK_CLASS", "audit.sink.FileSink")
SANDBOX_DIGEST_ED25519_PUBLIC_KEYS = os.environ.get("SANDBOX_DIGEST_ED25519_PUBLIC_KEYS", "")
SANDBOX_DIGEST_ED25519_DIR = Path(
    os.environ.get("SANDBOX_DIGEST_ED25519_DIR", DATA_DIR / "secrets" / "ed25519")
)
# Where finished exports are kept, and the size up to which an export runs inside the request.
SANDBOX_AUDIT_EXPORT_DIR = Path(os.environ.get("SANDBOX_AUDIT_EXPORT_DIR", DATA_DIR / "exports"))
SANDBOX_AUDIT_INLINE_EXPORT_MAX = env_int("SANDBOX_AUDIT_INLINE_EXPORT_MAX", 20_000)

# --- Security: forwarded headers, /metrics access, TLS, response headers (issue 10) ------------
# See docs/operations.md, "Security settings".


def env_networks(name: str, default: str) -> list[str]:
    """Comma-separated IP addresses or networks, normalised ("10.0.0.1" -> "10.0.0.1/32")."""
    import ipaddress

    networks = []
    for item in os.environ.get(name, default).split(","):
        if item.strip():
            try:
                networks.append(str(ipaddress.ip_network(item.strip(), strict=False)))
            except ValueError as exc:
                raise ImproperlyConfigured(
                    f"{name} must list IP addresses or networks, got {item.strip()!r}"
                ) from exc
    return networks


# Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed; nobody by default. The
# servers' own switches are off in every serving mode (sandbox_site/proxies.py).
SANDBOX_TRUSTED_PROXIES = env_networks("SANDBOX_TRUSTED_PROXIES", "")
# /metrics answers a scraper that sends this bearer token, or one from these networks.
SANDBOX_METRICS_TOKEN = os.environ.get("SANDBOX_METRICS_TOKEN", "")
SANDBOX_METRICS_ALLOWED_IPS = env_networks("SANDBOX_METRICS_ALLOWED_IPS", "127.0.0.0/8,::1")
# SANDBOX_HTTPS=true: clients reach the site over https (directly, or through a trusted proxy
# that sets X-Forwarded-Proto). Then plain http is redirected, cookies are https-only and HSTS
# is sent; each can be set on its own with the DJANGO_ variable of the same name.
SANDBOX_HTTPS = env_bool("SANDBOX_HTTPS", False)
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", SANDBOX_HTTPS)
# Probes and scrapers talk plain http on the inside.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", SANDBOX_HTTPS)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", SANDBOX_HTTPS)
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 31_536_000 if SANDBOX_HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", SANDBOX_HTTPS)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", False)
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
from csp.constants import NONCE  # noqa: E402

# Scripts only from our origin or with the response's nonce; no plugins, no framing. Styles may
# be inline (xterm.js and Swagger UI set them); websockets go to our own origin ('self').
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'", NONCE],
        "style-src": ["'self'", "'unsafe-inline'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    },
}

# --- Preview URLs: a guest's HTTP service at {port}-{vm_id}.<domain> (docs/networking.md) ------
# Served by this process (sandbox_site/preview.py) before Django sees the request. The domain
# must be one the dashboard is never served under, and no cookie of the dashboard's may be set
# for it (a separate registrable domain in production); empty turns previews off.
# Unset, it is preview.localhost (browsers resolve *.localhost to this machine) only while the
# dashboard is served under local names alone; a dashboard with a public name gets no preview
# URLs until a domain of its own is set (check sandbox.W040 says so): links to *.localhost would
# send its users to their own machines.
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]", "testserver"}
SANDBOX_PREVIEW_DOMAIN_DEFAULTED = "SANDBOX_PREVIEW_DOMAIN" not in os.environ
SANDBOX_PREVIEW_DOMAIN = os.environ.get(
    "SANDBOX_PREVIEW_DOMAIN",
    "preview.localhost"
    if all(h.strip().lower() in _LOCAL_HOSTS for h in ALLOWED_HOSTS if h.strip())
    else "",
)
SANDBOX_PREVIEW_DOMAIN = SANDBOX_PREVIEW_DOMAIN.strip().lower().rstrip(".")
for _host in ALLOWED_HOSTS:
    # The dashboard's own hosts never answer as a preview host (nor one of their subdomains).
    _host = _host.strip().lower().lstrip(".")
    if SANDBOX_PREVIEW_DOMAIN and (
        _host == SANDBOX_PREVIEW_DOMAIN or _host.endswith("." + SANDBOX_PREVIEW_DOMAIN)
    ):
        raise ImproperlyConfigured(
            f"SANDBOX_PREVIEW_DOMAIN {SANDBOX_PREVIEW_DOMAIN!r} covers the dashboard's host "
            f"{_host!r}: guest pages would share its origin"
        )
try:
    SANDBOX_PREVIEW_DENIED_PORTS = frozenset(
        int(p) for p in os.environ.get("SANDBOX_PREVIEW_DENIED_PORTS", "").split(",") if p.strip()
    )
except ValueError as _exc:
    raise ImproperlyConfigured("SANDBOX_PREVIEW_DENIED_PORTS must list port numbers") from _exc
# Shareable links: the longest lifetime that may be asked for, and the default.
SANDBOX_PREVIEW_LINK_MAX_S = env_int("SANDBOX_PREVIEW_LINK_MAX_S", 7 * 86400)
SANDBOX_PREVIEW_LINK_DEFAULT_S = env_int("SANDBOX_PREVIEW_LINK_DEFAULT_S", 3600)
# The dashboard's hand-off to the preview host, and the preview cookie it turns into.
SANDBOX_PREVIEW_HANDOFF_S = env_int("SANDBOX_PREVIEW_HANDOFF_S", 60)
SANDBOX_PREVIEW_SESSION_S = env_int("SANDBOX_PREVIEW_SESSION_S", 8 * 3600)
# Connecting to the guest, and the longest wait for its next bytes (long polls, event streams).
SANDBOX_PREVIEW_CONNECT_TIMEOUT_S = env_int("SANDBOX_PREVIEW_CONNECT_TIMEOUT_S", 5)
SANDBOX_PREVIEW_READ_TIMEOUT_S = env_int("SANDBOX_PREVIEW_READ_TIMEOUT_S", 300)
# Request and response header sets larger than this are refused (431 / 502).
SANDBOX_PREVIEW_MAX_HEADER_BYTES = env_int("SANDBOX_PREVIEW_MAX_HEADER_BYTES", 32 * 1024)
SANDBOX_PREVIEW_WS_MAX_MESSAGE_BYTES = env_int("SANDBOX_PREVIEW_WS_MAX_MESSAGE_BYTES", 16 << 20)
if not 1 <= SANDBOX_PREVIEW_LINK_DEFAULT_S <= SANDBOX_PREVIEW_LINK_MAX_S:
    raise ImproperlyConfigured(
        "SANDBOX_PREVIEW_LINK_DEFAULT_S must be between 1 and SANDBOX_PREVIEW_LINK_MAX_S"
    )

# --- Sandbox networking, the worker's host side (docs/networking.md) ---------------------------
# The resolvers' upstream DNS servers (IPv4, comma-separated), reached through the uplink; none:
# guests with allow-list or internet egress get no resolver (their CIDRs still apply).
SANDBOX_NET_DNS = os.environ.get("SANDBOX_NET_DNS", "")
# The resolvers' configurations, pidfiles and query logs, and the evidence cursors.
SANDBOX_NET_RUN_DIR = Path(os.environ.get("SANDBOX_NET_RUN_DIR", DATA_DIR / "network"))
# The namespace the host side of the host link goes to: empty is the host's own (tests name a
# namespace of their own standing in for the host; the port forwarder and the preview proxy
# connect to guests from there).
SANDBOX_NET_HOST_NS = os.environ.get("SANDBOX_NET_HOST_NS", "")
