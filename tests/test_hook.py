"""`Hook` and `to_hook`: every spec value normalized into one frozen record, or a SpecError
that names the key and the accepted forms."""

from __future__ import annotations

from typing import Any

import pytest

from hookfn import Hook, SpecError
from hookfn._plan import plan


@pytest.mark.parametrize("device", ["nope", 3.5, object(), "cuda:x"])
def test_a_bad_device_is_a_spec_error(device: Any) -> None:
    with pytest.raises(SpecError, match="device"):
        Hook(device=device)


BAD_VALUES = [
    "capturee",
    "Capture",
    None,
    3,
    (True, None),
    (True, False, None, 1),
    (1, 0, None),
    (True, False, "edit"),
    object(),
    ["capture"],
    lambda: None,
]


@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_value_names_the_key_and_the_accepted_forms(tiny_gpt2, value):
    with pytest.raises(SpecError) as info:
        plan(tiny_gpt2, {"transformer.h.0": "capture", "transformer.h.1.mlp": value})
    message = str(info.value)
    assert "'transformer.h.1.mlp'" in message
    assert "f(x)" in message  # says what an edit looks like
    if not callable(value):
        assert "accepted values: 'capture'" in message


def test_a_whole_structure_hook_takes_plain_functions_only() -> None:
    from hookfn import SpecError, add

    with pytest.raises(SpecError, match="whole"):
        Hook(add(1.0), whole=True)
    Hook(lambda out: out, whole=True)  # a plain function is fine
