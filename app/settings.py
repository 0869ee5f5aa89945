"""Where the clinic app keeps its data, and how to reach the teleradiology server.

Precedence for every server setting: command-line flag > environment > settings file.
Environment: ``TELERAD_URL``, ``TELERAD_USER``, ``TELERAD_PASSWORD``, ``TELERAD_TOKEN``
(bearer token instead of user/password), ``TELERAD_CA_BUNDLE``. The settings file is
``settings.json`` in the app data directory (``$MYELOMA_APP_DATA``, default
``~/.local/share/myeloma-ct``); its ``"server"`` object holds the same keys as
``ServerSettings``. Secrets never appear in ``repr``, logs or error messages.

The teleradiologist's worklist has its own credentials for the server: the ``"reader"`` object
of the settings file and ``TELERAD_READER_URL``, ``TELERAD_READER_USER``,
``TELERAD_READER_PASSWORD``, ``TELERAD_READER_TOKEN``, ``TELERAD_READER_CA_BUNDLE``
(``resolve_reader_settings``); without a reader URL it reads from the clinic's server URL.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from app.domain import AppError

log = logging.getLogger(__name__)

APP_DATA_ENV = "MYELOMA_APP_DATA"
DEFAULT_APP_DATA = Path("~/.local/share/myeloma-ct")
SETTINGS_FILE = "settings.json"
ENV_URL, ENV_USER, ENV_PASSWORD, ENV_TOKEN, ENV_CA_BUNDLE = (
    "TELERAD_URL", "TELERAD_USER", "TELERAD_PASSWORD", "TELERAD_TOKEN", "TELERAD_CA_BUNDLE")
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
SERVER_SECTION, SERVER_ENV_PREFIX = "server", "TELERAD_"
READER_SECTION, READER_ENV_PREFIX = "reader", "TELERAD_READER_"


def app_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """The app's data directory (created on first use, readable by its owner only: it holds patient data)."""
    env = os.environ if env is None else env
    path = Path(env.get(APP_DATA_ENV) or DEFAULT_APP_DATA).expanduser()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class ServerSettings:
    """One DICOMweb destination and how to talk to it."""

    url: str = ""
    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)  # bearer token; wins over user/password
    ca_bundle: str = ""  # PEM file of the CA that signed the server certificate; "" = system store
    deidentify: bool = True
    allow_plain_http: bool = False  # http:// to a host other than this computer
    proxy: str = field(default="", repr=False)  # outbound HTTP(S) proxy URL, e.g. http://proxy.hospital:3128
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    retry_attempts: int = 4  # tries per request, and upload rounds per delivery, before a case waits
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    batch_size: int = 8  # instances per STOW-RS request
    batch_max_mb: float = 32.0
    outbox_backoff_s: float = 60.0  # first wait before an automatic retry of a queued case
    outbox_backoff_max_s: float = 3600.0
    site_name: str = ""  # this clinic as the reading site sees it (InstitutionName of de-identified objects)

    def __post_init__(self) -> None:
        if self.url:
            object.__setattr__(self, "url", self.url.rstrip("/"))

    def require_url(self) -> ServerSettings:
        """Check the URL is usable; raise ``AppError`` with what to do otherwise."""
        if not self.url:
            raise AppError(f"no teleradiology server configured: pass --server URL, set {ENV_URL}, "
                           f"or put it in {SETTINGS_FILE} in the app data folder")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AppError(f"server URL {self.url!r} is not an http(s) URL, e.g. https://host/dicom-web")
        if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS and not self.allow_plain_http:
            raise AppError(f"server URL {self.url} is plain http to another computer: use https, "
                           "or set allow_plain_http in the settings file for a trusted private network")
        if self.ca_bundle and not Path(self.ca_bundle).is_file():
            raise AppError(f"CA bundle {self.ca_bundle} does not exist")
        return self

    def public_dict(self) -> dict:
        """Everything except the secrets (for the UI and for saving without them)."""
        d = asdict(self)
        for secret in ("password", "token", "proxy"):  # a proxy URL may carry credentials
            d.pop(secret)
        return d


def split_credentials(url: str) -> tuple[str, str, str]:
    """``https://user:pw@host/x`` -> (``https://host/x``, user, pw): credentials never stay in a URL."""
    parts = urlsplit(url.strip())
    if parts.username is None and parts.password is None:
        return url.strip(), "", ""
    netloc = parts.hostname or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return clean, unquote(parts.username or ""), unquote(parts.password or "")


def settings_path(data_dir: Path | None = None) -> Path:
    return (data_dir or app_data_dir()) / SETTINGS_FILE


def load_settings_file(data_dir: Path | None = None, section: str = SERVER_SECTION) -> dict:
    """The ``section`` object (``"server"`` or ``"reader"``) of the settings file ({} when there is none)."""
    path = settings_path(data_dir)
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text())
        server = document.get(section, {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise AppError(f"settings file {path} is not valid JSON; fix or delete it") from exc
    known = {f.name for f in fields(ServerSettings)}
    misplaced = sorted(set(document) & known)
    if misplaced:  # a flat {"url": ...} would otherwise be ignored without a word
        raise AppError(f"settings file {path} has {', '.join(misplaced)} at the top level; put the clinic's "
                       f'server settings inside "{SERVER_SECTION}": {{...}} and the reader\'s inside '
                       f'"{READER_SECTION}": {{...}}')
    unknown = sorted(set(server) - known)
    if unknown:
        raise AppError(f"settings file {path} has unknown {section} settings: {', '.join(unknown)}")
    return server


def save_server_settings(settings: ServerSettings, data_dir: Path | None = None,
                         keep_secrets: bool = True, section: str = SERVER_SECTION) -> Path:
    """Write the server settings (readable by this user only); other top-level keys are kept."""
    path = settings_path(data_dir)
    document = json.loads(path.read_text()) if path.is_file() else {}
    document[section] = asdict(settings) if keep_secrets else settings.public_dict()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(document, f, indent=2)
    os.replace(tmp, path)
    return path


def resolve_settings(server: str | None = None, user: str | None = None, deidentify: bool | None = None,
                     env: Mapping[str, str] | None = None, data_dir: Path | None = None,
                     section: str = SERVER_SECTION, env_prefix: str = SERVER_ENV_PREFIX) -> ServerSettings:
    """Merge flags, environment and settings file (in that order of precedence)."""
    env = os.environ if env is None else env
    values = dict(load_settings_file(data_dir, section))
    from_env = {key: env.get(f"{env_prefix}{key.upper()}") for key in ("url", "user", "password", "token",
                                                                       "ca_bundle")}
    values.update({k: v for k, v in from_env.items() if v})
    values.update({k: v for k, v in {"url": server, "user": user, "deidentify": deidentify}.items()
                   if v is not None})
    settings = ServerSettings(**values)
    url, url_user, url_password = split_credentials(settings.url)
    if url_user or url_password:
        log.warning("credentials found in the server URL were moved out of it; "
                    "prefer %s/%s", ENV_USER, ENV_PASSWORD)
        settings = replace(settings, url=url, user=settings.user or url_user,
                           password=settings.password or url_password)
    return settings


def resolve_reader_settings(env: Mapping[str, str] | None = None, data_dir: Path | None = None) -> ServerSettings:
    """The teleradiologist's connection: its own credentials; the clinic's server URL when it has none."""
    reader = resolve_settings(env=env, data_dir=data_dir, section=READER_SECTION, env_prefix=READER_ENV_PREFIX)
    if reader.url:
        return reader
    return replace(reader, url=resolve_settings(env=env, data_dir=data_dir).url)
