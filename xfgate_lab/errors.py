"""The harness's errors: part of xfgate's exception tree, defined apart from the product."""

from __future__ import annotations

from xfgate.errors import XfgateError


class LabError(XfgateError):
    """A lab (the QEMU demo lab or a private namespace lab) or a harness gate could not be
    built, started or stopped."""
