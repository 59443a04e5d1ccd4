"""String formats in structured output: the regular expressions that a JSON Schema string's `format` makes its
value fullmatch (`lorakit.serve.schema` compiles them as it does a `pattern`), and the shortest and longest value
of each, against which a schema's minLength and maxLength are checked.

    FORMATS["date"]          # a calendar date, February's 29th never
    FORMAT_LENGTHS["uuid"]   # (36, 36)
"""

from __future__ import annotations

_DATE = (
    r"\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
    r"|02-(?:0[1-9]|1\d|2[0-8]))"
)
"""A calendar date: each month's days (February's 29th never: no leap years in a regular expression)."""
_IPV4 = r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_HEX = r"[0-9a-fA-F]{1,4}"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,60}[A-Za-z0-9])?"
_HOSTNAME = rf"{_LABEL}(?:\.{_LABEL}){{0,3}}"  # (at most 4 labels of 62: within RFC 1123's 253 characters)
_N = r"\d{1,6}"
_DURATION_TIME = rf"T(?:{_N}H(?:{_N}M(?:{_N}S)?)?|{_N}M(?:{_N}S)?|{_N}S)"
_URI_CHARS = r"[A-Za-z0-9._~!$&'()*+,;=:@-]"
FORMATS = {
    "date": _DATE,
    "time": r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)",
    "date-time": _DATE
    + r"T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "email": r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}",
    "ipv4": _IPV4,
    "ipv6": "|".join(
        (
            rf"(?:{_HEX}:){{7}}{_HEX}",
            rf"(?:{_HEX}:){{1,7}}:",
            rf"(?:{_HEX}:){{1,6}}:{_HEX}",
            *(rf"(?:{_HEX}:){{1,{6 - n}}}(?::{_HEX}){{1,{n + 1}}}" for n in range(1, 5)),
            rf"{_HEX}:(?::{_HEX}){{1,6}}",
            rf":(?:(?::{_HEX}){{1,7}}|:)",
        )
    ),
    "hostname": _HOSTNAME,
    "duration": rf"P(?:(?:{_N}D|{_N}M(?:{_N}D)?|{_N}Y(?:{_N}M(?:{_N}D)?)?)(?:{_DURATION_TIME})?|{_DURATION_TIME}|{_N}W)",
    "uri": rf"https?://(?:{_HOSTNAME}|{_IPV4})(?::[1-9]\d{{0,3}})?(?:/{_URI_CHARS}{{0,64}}){{0,8}}"
    rf"(?:\?[/?{_URI_CHARS[1:-1]}]{{0,128}})?(?:#[/?{_URI_CHARS[1:-1]}]{{0,64}})?",
}
"""String formats enforced, as the patterns their values fullmatch (RFC 3339 for dates, times and durations, a
time with its offset; RFC 1123 host names of up to 4 labels; IPv6 addresses without an IPv4 part or a zone; URIs
that are http(s) URLs on a host name or IPv4 address, without percent escapes); any other format is an
annotation. Every pattern has a longest match, so that a schema's minLength and maxLength can be checked against
it (FORMAT_LENGTHS)."""
FORMAT_LENGTHS = {
    "date": (10, 10),
    "time": (9, 21),
    "date-time": (20, 32),
    "uuid": (36, 36),
    "email": (5, 640),
    "ipv4": (7, 15),
    "ipv6": (2, 39),
    "hostname": (1, 251),
    "duration": (3, 44),
    "uri": (8, 978),
}
"""The shortest and the longest value of each format (tests/test_serve_schema.py computes them from the patterns)."""
