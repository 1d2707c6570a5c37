"""PII scrubbing for training text: find personal data and replace it with typed placeholders.

Use it as a step in a data pipeline, before tokenization:

    texts = scrub_stream(iter_texts(config))          # an iterator in, an iterator out
    clean = scrub("mail me at ann@example.com")       # 'mail me at <EMAIL>'

What is found, and how false alarms are kept down:

* ``EMAIL``  local@domain.tld (RFC 5322's common subset).
* ``PHONE``  international numbers written with a leading ``+``/``00`` and a country code
  (7-15 digits, E.164), North-American ``(415) 555-0132`` / ``415-555-0132``, Chinese
  mobiles ``1[3-9]x xxxx xxxx`` (11 digits, optional +86) and landlines with their area code
  ``010-62751234``; never a longer run of digits.
* ``CN_ID``  Chinese resident identity numbers (GB 11643-1999): 18 characters whose date of
  birth is a real date and whose last character is the ISO 7064 MOD 11-2 check.
* ``CARD``   payment card numbers: 13-19 digits (spaces or hyphens between groups allowed)
  that pass the Luhn check (an 18-digit run shaped like an ID number is left to CN_ID).
* ``IP``     IPv4 (every octet 0-255, not part of a longer dotted run such as a version
  number 1.2.3.4.5 or 2.0.0.1-beta) and IPv6 (validated by the standard library's ``ipaddress``).

Checksums make the numeric kinds precise: a random 18-digit string passes the ID check
1 time in 11, a random card number passes Luhn 1 time in 10. Boundaries are ASCII-only, so
a number written flush against Chinese text (手机号13800138000，) is still found.
"""
from __future__ import annotations

import datetime
import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

KINDS = ("EMAIL", "CN_ID", "CARD", "PHONE", "IP")

_EMAIL = re.compile(r"(?<![A-Za-z0-9_.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![A-Za-z0-9_-])")
_CN_ID = re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}\d{2}\d{2}\d{3}[0-9Xx](?![0-9A-Za-z])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
_PHONE = re.compile(
    r"(?<![A-Za-z0-9_+])(?:"
    r"(?:\+|00)[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{1,5}){1,4}"  # +CC ... (international)
    r"|(?:\+?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}"  # Chinese mobile
    r"|\(\d{3}\)[ ]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4}"  # North American
    r"|0\d{2,3}-\d{7,8}"  # Chinese landline with its area code (010-62751234)
    r")(?![A-Za-z0-9_])")
_IPV4 = re.compile(r"(?<![A-Za-z0-9_.])(?:\d{1,3}\.){3}\d{1,3}(?![A-Za-z0-9_]|\.\d|-[A-Za-z0-9])")
_IPV6 = re.compile(r"(?<![A-Za-z0-9_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:\d{1,3}\.){3}\d{1,3})(?![A-Za-z0-9_:])")

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


# --------------------------------------------------------------------------- validators
def valid_cn_id(number: str) -> bool:
    """GB 11643-1999: a real date of birth and the MOD 11-2 check character."""
    number = number.upper()
    if len(number) != 18 or not number[:17].isdigit():
        return False
    if not _has_birth_date(number):
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return _ID_CHECK[total % 11] == number[17]


def _has_birth_date(number: str) -> bool:
    try:
        born = datetime.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    return datetime.date(1880, 1, 1) <= born <= datetime.date.today()


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check every payment card number carries."""
    if not digits.isdigit():
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _valid_card(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    groups = re.split(r"[ -]", text)
    if len(groups) > 1 and any(len(g) < 3 for g in groups):  # 4-4-4-4, 4-6-5 and the like, not "1 2 3 ..."
        return False
    if len(digits) == 18 and len(groups) == 1 and _has_birth_date(digits):  # an ID number with a bad check
        return False
    return luhn_valid(digits)


def _valid_phone(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    if text.startswith(("+", "00")):
        digits = digits[2:] if text.startswith("00") else digits
        return 7 <= len(digits) <= 15
    return len(digits) in (10, 11, 12, 13)


def _valid_ipv4(text: str) -> bool:
    parts = text.split(".")
    return all(p.isdigit() and int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in parts)


def _valid_ipv6(text: str) -> bool:
    if text.count(":") < 2 or not re.search(r"[0-9A-Fa-f]", text):
        return False
    if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2})?", text):  # a time of day
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


_FINDERS = {
    "EMAIL": (_EMAIL, lambda t: True),
    "CN_ID": (_CN_ID, valid_cn_id),
    "CARD": (_CARD, _valid_card),
    "PHONE": (_PHONE, _valid_phone),
    "IP": (None, None),  # two patterns, handled below
}


# --------------------------------------------------------------------------- finding and replacing
@dataclass(frozen=True)
class PIIMatch:
    kind: str
    start: int
    end: int
    text: str


def _check_kinds(kinds: Optional[Sequence[str]]) -> tuple[str, ...]:
    if kinds is None:
        return KINDS
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown PII kind {bad[0]!r}; valid: {', '.join(KINDS)}")
    return tuple(kinds)


def find_pii(text: str, kinds: Optional[Sequence[str]] = None) -> list[PIIMatch]:
    """Non-overlapping PII spans in ``text``, in order. Kinds are tried in the order of
    ``KINDS`` (most specific first), and a later kind never claims characters an earlier one took."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    taken: list[PIIMatch] = []

    def free(start: int, end: int) -> bool:
        return all(end <= m.start or start >= m.end for m in taken)

    for kind in _check_kinds(kinds):
        if kind == "IP":
            candidates = [(m, _valid_ipv4) for m in _IPV4.finditer(text)]
            candidates += [(m, _valid_ipv6) for m in _IPV6.finditer(text)]
        else:
            pattern, ok = _FINDERS[kind]
            candidates = [(m, ok) for m in pattern.finditer(text)]
        for m, ok in candidates:
            if ok(m.group()) and free(m.start(), m.end()):
                taken.append(PIIMatch(kind, m.start(), m.end(), m.group()))
    return sorted(taken, key=lambda m: m.start)


def scrub(text: str, kinds: Optional[Sequence[str]] = None, placeholder: str = "<{kind}>") -> str:
    """``text`` with every PII span replaced by ``placeholder`` formatted with its kind."""
    out, last = [], 0
    for m in find_pii(text, kinds):
        out.append(text[last:m.start])
        out.append(placeholder.format(kind=m.kind))
        last = m.end
    out.append(text[last:])
    return "".join(out)


class PIIScrubber:
    """A reusable pipeline step: ``scrubber(text) -> text``; ``scrubber.counts`` tallies what it
    replaced, by kind, so a data report can say how much personal data was removed."""

    def __init__(self, kinds: Optional[Sequence[str]] = None, placeholder: str = "<{kind}>"):
        self.kinds = _check_kinds(kinds)
        self.placeholder = placeholder
        self.counts: Counter = Counter()

    def __call__(self, text: str) -> str:
        matches = find_pii(text, self.kinds)
        self.counts.update(m.kind for m in matches)
        if not matches:
            return text
        out, last = [], 0
        for m in matches:
            out.append(text[last:m.start])
            out.append(self.placeholder.format(kind=m.kind))
            last = m.end
        out.append(text[last:])
        return "".join(out)

    def stream(self, texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            yield self(text)


def scrub_stream(texts: Iterable[str], kinds: Optional[Sequence[str]] = None,
                 placeholder: str = "<{kind}>") -> Iterator[str]:
    """Lazily scrub an iterable of texts (lines, documents): one in, one out, nothing held in memory."""
    return PIIScrubber(kinds, placeholder).stream(texts)


__all__ = ["KINDS", "PIIMatch", "PIIScrubber", "find_pii", "scrub", "scrub_stream", "valid_cn_id", "luhn_valid"]
