"""Fail fast, in one line, when a Hugging Face hub id cannot be reached.

With no network and ``HF_HUB_OFFLINE`` unset, ``from_pretrained`` and ``load_dataset`` retry each
request with back-off and log every retry: about 11 lines over half a minute before the error.
A model or data set already in the local Hugging Face cache loads without the network, so that is
tried first; otherwise one short connection to the hub says whether the slow path can succeed.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def offline_forced() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached from here (one short clause), or None when a connection
    opens. Proxies are honoured by the real request, not by this probe, so with a proxy set the
    probe is skipped."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"cannot reach {host} ({err.strerror or type(err).__name__}; no network?)"
