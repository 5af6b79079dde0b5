"""Reading and validating the gRPC xDS bootstrap JSON.

Every problem becomes ONE :class:`~pymesh.errors.BootstrapError` naming the source (the file
path, or ``GRPC_XDS_BOOTSTRAP_CONFIG``) and the dotted field path, e.g.
``xds_servers[0].channel_creds[1].type``. Unknown keys are ignored everywhere, as in gRPC.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import NoReturn

from pymesh.bootstrap._json import freeze_object
from pymesh.bootstrap._model import (
    DEFAULT_CLIENT_LISTENER_TEMPLATE,
    DEFAULT_REFRESH_INTERVAL,
    SUPPORTED_CHANNEL_CREDENTIALS,
    Authority,
    Bootstrap,
    CertificateProviderInstance,
    ChannelCredentials,
    FileWatcherConfig,
    Node,
    XdsServer,
)
from pymesh.bootstrap._templates import XDSTP_SCHEME, xdstp_authority
from pymesh.errors import BootstrapError
from pymesh.model.common import Locality

__all__ = ["ENV_BOOTSTRAP", "ENV_BOOTSTRAP_CONFIG", "load_bootstrap", "parse_bootstrap"]

ENV_BOOTSTRAP = "GRPC_XDS_BOOTSTRAP"
ENV_BOOTSTRAP_CONFIG = "GRPC_XDS_BOOTSTRAP_CONFIG"

# Protobuf JSON form of google.protobuf.Duration: "900s", "1.5s" (non-negative here).
_LISTENER_TYPE = "envoy.config.listener.v3.Listener"
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_DURATION = re.compile(r"(\d{1,12})(?:\.(\d{1,9}))?s")


def load_bootstrap(environ: Mapping[str, str] | None = None) -> Bootstrap:
    """Load the bootstrap the way gRPC does.

    ``GRPC_XDS_BOOTSTRAP`` (a file path) wins over ``GRPC_XDS_BOOTSTRAP_CONFIG`` (the JSON
    itself). An empty variable counts as unset. ``environ`` defaults to ``os.environ``.
    """
    env = os.environ if environ is None else environ
    path = env.get(ENV_BOOTSTRAP, "")
    if path:
        return parse_bootstrap(_read_file(path), source=path)
    inline = env.get(ENV_BOOTSTRAP_CONFIG, "")
    if inline:
        return parse_bootstrap(inline, source=ENV_BOOTSTRAP_CONFIG)
    raise BootstrapError(
        f"no xDS bootstrap: set {ENV_BOOTSTRAP} to a file path or {ENV_BOOTSTRAP_CONFIG} to "
        "the JSON (`pymesh bootstrap -o FILE` writes one)"
    )


def _read_file(path: str) -> str:
    try:
        # utf-8-sig: a byte-order mark some editors add is not an error.
        with open(path, encoding="utf-8-sig") as fh:
            return fh.read()
    except FileNotFoundError:
        raise BootstrapError(f"file not found (from {ENV_BOOTSTRAP})", source=path) from None
    except IsADirectoryError:
        raise BootstrapError("is a directory, not a file", source=path) from None
    except PermissionError:
        raise BootstrapError("permission denied", source=path) from None
    except UnicodeDecodeError as exc:
        raise BootstrapError(f"not UTF-8 text (byte {exc.start})", source=path) from None
    except OSError as exc:
        raise BootstrapError(f"cannot read: {exc.strerror or exc}", source=path) from None


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def parse_bootstrap(text: str, *, source: str) -> Bootstrap:
    """Parse and validate bootstrap JSON ``text``; ``source`` names it in errors."""
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise BootstrapError(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", source=source
        ) from None
    except (ValueError, RecursionError) as exc:
        raise BootstrapError(f"invalid JSON: {exc}", source=source) from None
    try:
        return _Parser(source).bootstrap(data)
    except RecursionError:
        raise BootstrapError("JSON nested too deeply", source=source) from None


class _Parser:
    """Typed accessors that raise a BootstrapError naming the field path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> NoReturn:
        raise BootstrapError(message, source=self.source, field=path or None)

    # -- primitive accessors -------------------------------------------------------------

    def obj(self, value: object, path: str) -> Mapping[str, object]:
        if not isinstance(value, dict):
            self.fail(path, f"must be a JSON object, got {_kind(value)}")
        return value

    def opt_obj(self, parent: Mapping[str, object], key: str, path: str) -> Mapping[str, object]:
        value = parent.get(key)
        if value is None:
            return {}
        return self.obj(value, _join(path, key))

    def opt_str(self, parent: Mapping[str, object], key: str, path: str) -> str | None:
        value = parent.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(_join(path, key), f"must be a string, got {_kind(value)}")
        return value

    def req_str(self, parent: Mapping[str, object], key: str, path: str) -> str:
        value = self.opt_str(parent, key, path)
        if value is None:
            self.fail(_join(path, key), "is required")
        if not value:
            self.fail(_join(path, key), "must not be empty")
        return value

    def opt_list(self, parent: Mapping[str, object], key: str, path: str) -> list[object]:
        value = parent.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(_join(path, key), f"must be a JSON array, got {_kind(value)}")
        return value

    def str_list(self, parent: Mapping[str, object], key: str, path: str) -> list[str]:
        items = self.opt_list(parent, key, path)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                self.fail(f"{_join(path, key)}[{i}]", f"must be a string, got {_kind(item)}")
        return [str(item) for item in items]

    def duration(self, parent: Mapping[str, object], key: str, path: str) -> float | None:
        value = parent.get(key)
        if value is None:
            return None
        where = _join(path, key)
        if not isinstance(value, str):
            self.fail(where, f'must be a duration string such as "600s", got {_kind(value)}')
        match = _DURATION.fullmatch(value)
        if match is None:
            self.fail(where, f'must be a duration string such as "600s", got {value!r}')
        seconds = int(match.group(1)) + int((match.group(2) or "0").ljust(9, "0")) / 1e9
        if seconds <= 0:
            self.fail(where, "must be positive")
        return seconds

    # -- sections ------------------------------------------------------------------------

    def bootstrap(self, data: object) -> Bootstrap:
        root = self.obj(data, "")
        servers = self.xds_servers(root, "", required=True)
        node = self.node(self.opt_obj(root, "node", ""), "node")
        providers = self.certificate_providers(root)
        server_tpl = self.opt_str(root, "server_listener_resource_name_template", "")
        client_tpl = self.opt_str(root, "client_default_listener_resource_name_template", "")
        authorities = self.authorities(root)
        for key, tpl in (
            ("server_listener_resource_name_template", server_tpl),
            ("client_default_listener_resource_name_template", client_tpl),
        ):
            if tpl is None:
                continue
            if not tpl:
                self.fail(key, "must not be empty")
            authority = xdstp_authority(tpl)
            if authority is None:
                continue
            if authority not in authorities:
                self.fail(
                    key,
                    f"xdstp authority {authority!r} is not in authorities "
                    f"(known: {sorted(authorities) or 'none'})",
                )
            self.check_xdstp_listener(tpl, f"{XDSTP_SCHEME}//{authority}/", key)
        return Bootstrap(
            xds_servers=servers,
            node=node,
            certificate_providers=providers,
            server_listener_resource_name_template=server_tpl,
            client_default_listener_resource_name_template=(
                client_tpl if client_tpl is not None else DEFAULT_CLIENT_LISTENER_TEMPLATE
            ),
            authorities=authorities,
            source=self.source,
        )

    def xds_servers(
        self, parent: Mapping[str, object], path: str, *, required: bool
    ) -> tuple[XdsServer, ...]:
        where = _join(path, "xds_servers")
        items = self.opt_list(parent, "xds_servers", path)
        if required and not items:
            problem = "is required" if "xds_servers" not in parent else "must not be empty"
            self.fail(where, f"{problem}: list at least one xDS server")
        return tuple(self.xds_server(item, f"{where}[{i}]") for i, item in enumerate(items))

    def xds_server(self, value: object, path: str) -> XdsServer:
        entry = self.obj(value, path)
        uri = self.req_str(entry, "server_uri", path)
        creds = self.channel_creds(entry, path)
        features = frozenset(self.str_list(entry, "server_features", path))
        return XdsServer(uri=uri, channel_credentials=creds, server_features=features)

    def channel_creds(self, parent: Mapping[str, object], path: str) -> ChannelCredentials:
        where = _join(path, "channel_creds")
        items = self.opt_list(parent, "channel_creds", path)
        if not items:
            problem = "is required" if "channel_creds" not in parent else "must not be empty"
            self.fail(where, f'{problem} (e.g. [{{"type": "insecure"}}])')
        seen: list[str] = []
        for i, item in enumerate(items):
            entry_path = f"{where}[{i}]"
            entry = self.obj(item, entry_path)
            kind = self.req_str(entry, "type", entry_path)
            if kind not in SUPPORTED_CHANNEL_CREDENTIALS:
                seen.append(kind)
                continue
            config = self.opt_obj(entry, "config", entry_path)
            tls: FileWatcherConfig | None = None
            if kind == "tls":
                tls = self.file_watcher(config, _join(entry_path, "config"), need_any=False)
            elif kind == "google_default":
                tls = FileWatcherConfig()
            return ChannelCredentials(type=kind, config=freeze_object(config), tls=tls)
        self.fail(
            where,
            f"no supported channel credentials type (got {', '.join(map(repr, seen))}; "
            f"pymesh supports {', '.join(SUPPORTED_CHANNEL_CREDENTIALS)})",
        )

    def file_watcher(
        self, config: Mapping[str, object], path: str, *, need_any: bool
    ) -> FileWatcherConfig:
        cert = self.opt_str(config, "certificate_file", path) or None
        key = self.opt_str(config, "private_key_file", path) or None
        ca = self.opt_str(config, "ca_certificate_file", path) or None
        refresh = self.duration(config, "refresh_interval", path)
        if (cert is None) != (key is None):
            missing = "private_key_file" if key is None else "certificate_file"
            self.fail(
                _join(path, missing),
                "certificate_file and private_key_file must be given together",
            )
        if need_any and cert is None and ca is None:
            self.fail(
                path,
                "must give certificate_file and private_key_file, or ca_certificate_file",
            )
        return FileWatcherConfig(
            certificate_file=cert,
            private_key_file=key,
            ca_certificate_file=ca,
            refresh_interval=DEFAULT_REFRESH_INTERVAL if refresh is None else refresh,
        )

    def node(self, entry: Mapping[str, object], path: str) -> Node:
        node_id = self.opt_str(entry, "id", path) or ""
        cluster = self.opt_str(entry, "cluster", path) or ""
        loc = self.opt_obj(entry, "locality", path)
        loc_path = _join(path, "locality")
        locality = Locality(
            region=self.opt_str(loc, "region", loc_path) or "",
            zone=self.opt_str(loc, "zone", loc_path) or "",
            sub_zone=self.opt_str(loc, "sub_zone", loc_path) or "",
        )
        metadata = self.opt_obj(entry, "metadata", path)
        return Node(
            id=node_id,
            cluster=cluster,
            locality=locality,
            metadata=freeze_object(metadata),
        )

    def certificate_providers(
        self, root: Mapping[str, object]
    ) -> Mapping[str, CertificateProviderInstance]:
        section = self.opt_obj(root, "certificate_providers", "")
        out: dict[str, CertificateProviderInstance] = {}
        for name, value in section.items():
            path = _member("certificate_providers", name)
            entry = self.obj(value, path)
            plugin = self.req_str(entry, "plugin_name", path)
            config = self.opt_obj(entry, "config", path)
            watcher = None
            if plugin == "file_watcher":
                watcher = self.file_watcher(config, _join(path, "config"), need_any=True)
            out[name] = CertificateProviderInstance(
                plugin_name=plugin, config=freeze_object(config), file_watcher=watcher
            )
        return MappingProxyType(out)

    def check_xdstp_listener(self, template: str, prefix: str, path: str) -> None:
        # xdstp://AUTHORITY/TYPE/ID: gRPC cannot use a Listener name of another type.
        rest = template[len(prefix) :] if template.startswith(prefix) else ""
        if not rest.startswith(_LISTENER_TYPE + "/"):
            self.fail(path, f"an xdstp: Listener name must start with {prefix + _LISTENER_TYPE!r}/")

    def authorities(self, root: Mapping[str, object]) -> Mapping[str, Authority]:
        section = self.opt_obj(root, "authorities", "")
        out: dict[str, Authority] = {}
        for name, value in section.items():
            path = _member("authorities", name)
            entry = self.obj(value, path)
            prefix = f"{XDSTP_SCHEME}//{name}/"
            template = self.opt_str(entry, "client_listener_resource_name_template", path)
            if template is None:
                template = f"{prefix}envoy.config.listener.v3.Listener/%s"
            else:
                where = _join(path, "client_listener_resource_name_template")
                if not template.startswith(prefix):
                    self.fail(where, f"must start with {prefix!r}")
                self.check_xdstp_listener(template, prefix, where)
            servers = self.xds_servers(entry, path, required=False)
            out[name] = Authority(
                name=name,
                client_listener_resource_name_template=template,
                xds_servers=servers,
            )
        return MappingProxyType(out)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _member(path: str, name: str) -> str:
    # Map keys the user chose: plain ones read as fields, others (dots, empty) are quoted.
    if _PLAIN_KEY.fullmatch(name):
        return f"{path}.{name}"
    return f"{path}[{json.dumps(name)}]"


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
