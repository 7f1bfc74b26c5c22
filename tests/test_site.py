"""`Site`: the read-only description of where an edit runs."""

from __future__ import annotations

import pytest
from torch import nn

from hookfn import Site


@pytest.mark.parametrize("field", ["call", "kind", "module"])
def test_site_fields_are_read_only(field):
    module = nn.Identity()
    site = Site("enc.0", call=1, kind="output", module=module)
    with pytest.raises(AttributeError, match="read-only"):
        setattr(site, field, None)
    with pytest.raises(AttributeError, match="read-only"):
        delattr(site, field)
    assert (str(site), site.call, site.kind, site.module) == ("enc.0", 1, "output", module)
