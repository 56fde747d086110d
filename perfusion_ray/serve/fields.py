"""The field types every request of both apps is built from: text that is valid Unicode without control
characters, map keys, whole numbers that are not booleans, finite numbers that are not strings.

Each check runs in pydantic, on the HTTP path and the handle path alike, and on map keys and values as
well as plain fields: a string that cannot be encoded as UTF-8 (a lone surrogate, which JSON's \\ud800
escape can carry) or that holds a NUL would otherwise travel on into tokenizers, hashes and file paths,
where it fails as a server error, taking the requests batched with it down too.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, Strict

# Control characters (Unicode category Cc) but tab, line feed and carriage return (prompts may be typed on
# several lines), and surrogates, which only appear alone in a Python string decoded from JSON.
FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def check_text(value: str) -> str:
    """`value` unchanged, or ValueError naming the first character no field may hold."""
    found = FORBIDDEN.search(value)
    if found is None:
        return value
    code = ord(found.group())
    what = "a lone surrogate: not valid Unicode" if 0xD800 <= code <= 0xDFFF else "a control character"
    raise ValueError(f"character {found.start()} (U+{code:04X}) is {what}")


def refuse_non_numbers(value):
    """JSON's true/false and strings are not numbers, even where Python would convert them."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"a number is required, got {type(value).__name__}")
    return value


MAX_KEY_CHARS = 64
MAX_VALUE_CHARS = 256

Text = Annotated[str, AfterValidator(check_text)]
# Map keys name a side feature or a stat: short and non-empty.
Key = Annotated[str, Field(min_length=1, max_length=MAX_KEY_CHARS), AfterValidator(check_text)]
FeatureValue = Annotated[str, Field(max_length=MAX_VALUE_CHARS), AfterValidator(check_text)]
# Strict: `false` is not 0 and "4" is not 4.
WholeNumber = Annotated[int, Strict()]
FiniteFloat = Annotated[float, BeforeValidator(refuse_non_numbers), Field(allow_inf_nan=False)]
