"""Making a NACK's ``error_detail`` safe to log, count and show.

Envoy's proto-constraint errors echo the offending message in text format; for a Secret that is
the inline private key. A Secret NACK is therefore never shown beyond a digest (enough to tell two
errors apart) and the resource names it mentions; any other error is shown with every PEM block
and inline key/bytes field scrubbed, in case a resource ever carries key material inline.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from meshward.xds import typeurls

_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----.*?(-----END [A-Z0-9 ]+-----|$)", re.DOTALL)
_INLINE = re.compile(
    r"\b(inline_bytes|inline_string|private_key|inlineBytes|inlineString|privateKey)"
    r"(\s*[:{]\s*)(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|\{[^}]*\}|\S+)",
    re.DOTALL,
)
MAX_LENGTH = 2000


def redact_error(type_url: str, error: str, names: Iterable[str] = ()) -> str:
    digest = hashlib.sha256(error.encode(errors="replace")).hexdigest()[:12]
    if type_url == typeurls.SECRET:
        mentioned = sorted(name for name in names if name and name in error)
        about = f" about {', '.join(mentioned)}" if mentioned else ""
        return f"[redacted Secret NACK{about}: {len(error)} chars, sha256 {digest}]"
    scrubbed = _PEM.sub("[redacted PEM]", error)
    scrubbed = _INLINE.sub(lambda m: f"{m.group(1)}{m.group(2)}[redacted]", scrubbed)
    if len(scrubbed) > MAX_LENGTH:
        scrubbed = scrubbed[:MAX_LENGTH] + f"... [truncated, sha256 {digest}]"
    return scrubbed
