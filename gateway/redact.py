"""Scrubbing provider secrets from anything that goes back to a client or a log.

A secret is scrubbed in its plain form and in the forms an upstream may echo it in: JSON-escaped (any
character as `\\uXXXX` in either hex case, or as a short escape such as `\\/`) and percent-encoded
(`%XX`, either case), each character in any of these forms. Data without a backslash or a `%` costs
two byte searches more than the plain scrub; other data has the escapes of the secrets' own characters
decoded (one regex pass that skips to each backslash or `%`) and the secrets looked for again, and only
data that then shows one goes through the slower pattern that replaces every form in place.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterable, Iterator

__all__ = ["REDACTED", "Redactor"]

REDACTED = b"[redacted]"
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                  "\t": "\\t"}


def _hex_cases(value: int, digits: int) -> Iterator[str]:
    """`value` as hex digits, in every mix of upper and lower case."""
    cases = [""]
    for digit in f"{value:0{digits}x}":
        cases = [case + d for case in cases for d in {digit, digit.upper()}]
    return iter(cases)


def _hex_pattern(value: int, digits: int) -> str:
    """A pattern for `value` as hex digits in either case."""
    return "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{value:0{digits}x}")


def _char_pattern(char: str) -> str:
    """A pattern for one character: itself, JSON-escaped or percent-encoded."""
    forms = [re.escape(char), "".join("%" + _hex_pattern(byte, 2) for byte in char.encode())]
    if ord(char) < 0x10000:
        forms.append(r"\\u" + _hex_pattern(ord(char), 4))
    if char in _SHORT_ESCAPES:
        forms.append(re.escape(_SHORT_ESCAPES[char]))
    return "(?:" + "|".join(forms) + ")"


def _json_escapes(chars: Iterable[str]) -> dict[bytes, bytes]:
    """Every JSON escape of `chars` (BMP ones as \\uXXXX, and short escapes), to the character's UTF-8."""
    table = {f"\\u{hex4}".encode(): c.encode() for c in chars if ord(c) < 0x10000 for hex4 in _hex_cases(ord(c), 4)}
    table.update((_SHORT_ESCAPES[c].encode(), c.encode()) for c in chars if c in _SHORT_ESCAPES)
    return table


def _percent_escapes(chars: Iterable[str]) -> dict[bytes, bytes]:
    """Every %XX of the UTF-8 bytes of `chars`, to the byte."""
    return {f"%{hex2}".encode(): bytes([b]) for b in {b for c in chars for b in c.encode()}
            for hex2 in _hex_cases(b, 2)}


class _Decoding:
    """Decodes the escapes of one table, and only those."""

    def __init__(self, table: dict[bytes, bytes]) -> None:
        self._table = table
        self._pattern = re.compile(b"|".join(map(re.escape, sorted(table, key=len, reverse=True))))

    def __call__(self, data: bytes) -> bytes | None:
        """`data` decoded, or None when it holds none of the escapes."""
        decoded, count = self._pattern.subn(self._plain, data)
        return decoded if count else None

    def _plain(self, match: re.Match[bytes]) -> bytes:
        return self._table[match.group()]


class Redactor:
    """Replaces every known secret in bytes or text; secrets shorter than 8 characters are ignored.

    Characters outside the Basic Multilingual Plane are found plain and percent-encoded, not as JSON
    surrogate pairs (provider keys and header values are ASCII).
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        texts = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)
        self._secrets = tuple(s.encode() for s in texts)
        chars = {c for text in texts for c in text}
        self._encoded = re.compile("|".join("".join(map(_char_pattern, text)) for text in texts).encode())
        self._json = _Decoding(_json_escapes(chars))
        self._percent = _Decoding(_percent_escapes(chars))

    def bytes(self, data: bytes) -> bytes:
        """`data` with each secret, plain or encoded, replaced by [redacted]."""
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, REDACTED)
        # (find: a one-byte `in` does not use memchr, and costs twice as much on a 1 KB answer)
        if self._secrets and (data.find(b"\\") >= 0 or data.find(b"%") >= 0) and self._hides_one(data):
            data = self._encoded.sub(REDACTED, data)
        return data

    def text(self, data: str) -> str:
        """`data` with each secret replaced by [redacted]."""
        return self.bytes(data.encode()).decode(errors="replace") if self._secrets else data

    def _hides_one(self, data: builtins.bytes) -> bool:
        """Whether a secret shows once the JSON escapes, then the %XX, of the secrets' characters are decoded."""
        unescaped = self._json(data) if data.find(b"\\") >= 0 else None
        if unescaped is not None and self._shows(unescaped):
            return True
        data = data if unescaped is None else unescaped
        unquoted = self._percent(data) if data.find(b"%") >= 0 else None
        return unquoted is not None and self._shows(unquoted)

    def _shows(self, data: builtins.bytes) -> bool:
        """Whether a secret occurs plainly in `data`."""
        return any(secret in data for secret in self._secrets)
