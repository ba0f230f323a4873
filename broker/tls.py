"""TLS for the broker link (`mqtts://`): the broker's certificate is checked against the trust
anchors (MQTT_CA_FILE, or the system's store) and its host name; a client certificate is
presented when the broker asks for one."""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(
    *, ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    # create_default_context: certificate required, host name checked, no SSLv3/TLS 1.0.
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if cert_file is not None:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except (ssl.SSLError, OSError) as error:
        raise TlsFilesError(f"MQTT TLS files could not be loaded: {error}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class TlsFilesError(ValueError):
    """MQTT_CA_FILE / MQTT_CLIENT_CERT_FILE / MQTT_CLIENT_KEY_FILE are not usable."""
