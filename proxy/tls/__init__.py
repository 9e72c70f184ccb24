"""TLS for Warren: certificates and keys (files), SSL contexts, the material of one configuration.

- :mod:`.files`: PEM certificates, keys, CA bundles and CRLs read and checked
  with `cryptography` (file and reason for every problem);
- :mod:`.contexts`: SSLContext factories with sound defaults, SNI selection;
- :mod:`.store`: every context of a configuration, built all or nothing
  (start, SIGHUP) so an invalid set never replaces a working one;
- :mod:`.pump`: TLS on the relays' poller (ssl.SSLObject + MemoryBIO), no task per connection.
"""

from .contexts import DEFAULT_CIPHERS, SniTable
from .files import CertificateInfo, Identity, TlsFileError, load_identity
from .store import EXPIRY_WARNING_DAYS, BindSet, CertificateUse, TlsConfigError, TlsMaterial, build_material

__all__ = [
    "DEFAULT_CIPHERS", "EXPIRY_WARNING_DAYS", "BindSet", "CertificateInfo", "CertificateUse", "Identity",
    "SniTable", "TlsConfigError", "TlsFileError", "TlsMaterial", "build_material", "load_identity",
]
