"""One network probe for every download path (hub weights, Hugging Face datasets, CIFAR): their clients retry for
tens of seconds or have no timeout at all, so offline a short TCP connect decides first and the user gets advice
within seconds."""
from __future__ import annotations

import socket
import urllib.parse

PROBE_SECONDS = 3.0


def reachable(url_or_host: str, timeout: float = PROBE_SECONDS) -> str | None:
    """None when a TCP connection to the host (port 443) opens within `timeout`, else the reason it did not."""
    host = urllib.parse.urlparse(url_or_host).hostname if "://" in url_or_host else url_or_host
    try:
        socket.create_connection((host or url_or_host, 443), timeout=timeout).close()
        return None
    except OSError as err:
        return f"{host} cannot be reached ({err})"


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT
