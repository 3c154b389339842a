"""Join a running Ray cluster whatever its authentication, with nothing for the user to set.

Ray turns token authentication on for ``ray start --head`` as soon as a token exists (``~/.ray/auth_token``, which
any earlier local Ray run creates), but a driver that joins an explicit HOST:PORT sends its token only when
RAY_AUTH_MODE=token is set in its own environment (``ray/_private/worker.py``: "Only a local cluster found
automatically auto-enables auth; an explicit address (argument or RAY_ADDRESS) never does"). Without it every call
is refused with ``InvalidAuthToken`` and ``ray.init`` gives up after its connect timeout.

So the head is asked first: ``GetClusterId``, the first call every Ray client makes to the GCS, answers without a
token on a cluster without authentication and is refused with UNAUTHENTICATED on one with tokens. Only then is the
local token (found the way Ray finds it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ``~/.ray/auth_token``) shown to the
head, and only once the head accepts it is token mode switched on for this process, the way Ray's own
``authentication_token_setup._enable_token_auth`` does it (RAY_AUTH_MODE=token in ``os.environ``, then RayConfig
re-read). A head without tokens leaves ``os.environ`` untouched; a RAY_AUTH_MODE the user set is kept; a missing or
wrong token is a one-line :class:`DistQuantError` that says what to set.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from dist_quant.errors import DistQuantError

log = logging.getLogger("dist_quant")

AUTH_MODE = "RAY_AUTH_MODE"
PROBE_TIMEOUT_S = 15.0  # one unary call to the GCS; a loaded head answers in milliseconds

# What the head said to GetClusterId.
ANSWERED, REFUSED, UNREACHABLE, UNKNOWN = "answered", "refused", "unreachable", "unknown"


def token_source() -> Optional[str]:
    """Where Ray's token loader takes the token from, in its own order; None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() and default.stat().st_size else None


def local_token_metadata() -> tuple:
    """The gRPC metadata Ray would send with this machine's token (``(("authorization", "Bearer ..."),)``), or ()
    when there is no token. Read fresh: the loader caches, and the environment may have changed since."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    try:
        return tuple(loader.get_token_for_http_header(ignore_auth_mode=True).items())
    except Exception as error:  # e.g. RAY_AUTH_TOKEN_PATH names a missing or empty file
        raise DistQuantError(f"cannot read this machine's Ray token ({getattr(error, 'message', error)}); set "
                             "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the head's token") from None


def ask_head(address: str, metadata: tuple = (), timeout: float = PROBE_TIMEOUT_S) -> str:
    """Call the GCS at ADDRESS (HOST:PORT) once, with METADATA: ANSWERED, REFUSED (UNAUTHENTICATED: token
    authentication is on and the token, if any, is not the head's), UNREACHABLE or UNKNOWN."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        from ray._common.tls_utils import load_certs_from_env

        cert, key, ca = load_certs_from_env()
        credentials = grpc.ssl_channel_credentials(certificate_chain=cert, private_key=key, root_certificates=ca)
        channel = grpc.secure_channel(address, credentials)
    else:
        channel = grpc.insecure_channel(address)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout, metadata=metadata)
        return ANSWERED
    except grpc.RpcError as error:
        code = error.code() if callable(getattr(error, "code", None)) else None
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return REFUSED
        return UNREACHABLE if code == grpc.StatusCode.UNAVAILABLE else UNKNOWN
    finally:
        channel.close()


def supports_token_auth() -> bool:
    """Ray releases before token authentication have nothing to detect (and no call to probe with)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config  # noqa: F401
        from ray.core.generated.gcs_service_pb2 import GetClusterIdRequest  # noqa: F401
    except ImportError:
        return False
    return True


def set_token_mode(on: bool) -> None:
    """Token mode for this process and its children, as Ray's _enable_token_auth sets it; off removes it again."""
    from ray._raylet import Config

    if on:
        os.environ[AUTH_MODE] = "token"
    else:
        os.environ.pop(AUTH_MODE, None)
    Config.initialize("")  # RayConfig caches the mode: re-read it from the environment


def prepare_auth(address: str) -> bool:
    """Make this process authenticate the way the head at ADDRESS expects; True when it switched token mode on
    (the head demands a token, RAY_AUTH_MODE was unset, and the head accepts this machine's token)."""
    if address.startswith("ray://") or not supports_token_auth():
        return False
    explicit = os.environ.get(AUTH_MODE)
    if ask_head(address) != REFUSED:
        return False  # no authentication there (or no answer: ray.init says why, as before)
    if explicit is not None and explicit.strip().lower() != "token":
        raise DistQuantError(f"the Ray cluster at {address} uses token authentication but {AUTH_MODE}={explicit} "
                             f"here: unset {AUTH_MODE} (dist-quant then sends the token from RAY_AUTH_TOKEN, "
                             "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
    metadata = local_token_metadata()
    if not metadata:
        raise DistQuantError(f"the Ray cluster at {address} uses token authentication and this machine has no "
                             "token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the head's token, the content of "
                             "~/.ray/auth_token on the head node, or copy that file here")
    if ask_head(address, metadata) == REFUSED:
        raise DistQuantError(f"the Ray cluster at {address} refused this machine's token (from {token_source()}): "
                             "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the head's token, the content of "
                             "~/.ray/auth_token on the head node")
    if explicit is not None:
        return False
    set_token_mode(True)
    log.debug("the Ray cluster at %s uses token authentication: RAY_AUTH_MODE=token for this process", address)
    return True


def resolve_address(address: str) -> str:
    """'auto' (the cluster on this node) as HOST:PORT, so that the probe and ray.init see the same head; any other
    address as it is. Unresolved 'auto' stays 'auto' and ray.init reports why."""
    if address != "auto":
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        return canonicalize_bootstrap_address_or_die(address)
    except Exception:
        return address


def join_cluster(ray, address: str, **init_kwargs) -> None:
    """``ray.init(address=...)`` on a running cluster, with token authentication when, and only when, the head uses
    it. Every failure is a one-line DistQuantError."""
    target = resolve_address(address)
    switched = prepare_auth(target) if target != "auto" else False
    try:
        ray.init(address=target, **init_kwargs)
    except Exception as error:
        if switched:
            set_token_mode(False)
        auth_error = getattr(getattr(ray, "exceptions", None), "AuthenticationError", ())
        if not isinstance(error, (ConnectionError, RuntimeError, ValueError, auth_error)):
            raise
        reason = " ".join(str(getattr(error, "message", error)).split())
        raise DistQuantError(f"cannot join the Ray cluster at {address!r} ({reason}); start it with "
                             "launch/start_head.sh and check the address") from None
