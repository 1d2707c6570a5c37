"""PII scrubbing for training text: find personal data and replace it with typed placeholders.

Use it as a step in a data pipeline, before tokenization:

    texts = scrub_stream(iter_texts(config))          # an iterator in, an iterator out
    clean = scrub("mail me at ann@example.com")       # 'mail me at <EMAIL>'
    step = PIIScrubber(regions=["CN", "US", "GB", "DE"], kinds=set(KINDS) - {"IP"})

What is found. Every kind has a validity rule, because a pattern alone flags order numbers,
dates and versions; each kind can be switched off (``kinds=``) and its placeholder names it:

* ``EMAIL``  local@domain.tld (RFC 5322's common subset).
* ``IBAN``   2 letters, 2 check digits, the country's BBAN: the length must be the one in
  the SWIFT IBAN registry for that country and the ISO 7064 mod-97 check must give 1;
  written solid or in groups of four.
* ``CN_ID``  Chinese resident identity numbers (GB 11643-1999): a real date of birth and the
  ISO 7064 MOD 11-2 check character.
* ``CARD``   payment card numbers: the prefix and length must belong to a card brand
  (``CARD_BRANDS``: Visa, Mastercard, Amex, Maestro 12-19 digits, UnionPay, JCB, Diners ...)
  and the Luhn check must pass; solid or grouped as cards are printed (4-4-4-4, 4-6-5).
* ``SSN``    US social security numbers AAA-GG-SSSS with the SSA's rules (area not 000, 666
  or 900-999, group not 00, serial not 0000); nine digits without the hyphens only after
  the word SSN / social security.
* ``PASSPORT``, ``DRIVER_LICENSE``  these numbers have no checksum and no common shape, so
  they are found only right after a context word ("passport", "护照", "licence", ...).
* ``IP``     IPv4 (every octet 0-255, not part of a longer dotted run such as a version
  number 1.2.3.4.5) and IPv6 (validated by the standard library's ``ipaddress``).
* ``PHONE``  phone numbers of every country through ``phonenumbers`` (Google's
  libphonenumber): numbers written with ``+``/``00`` and a country code are found whatever
  the region; numbers in national form (``07700 900123``, ``010-62751234``) only for the
  ``regions`` you list, because a national number is just digits: ``2024-03-15`` is a valid
  phone number in ten countries, so listing all 245 regions flags dates and order numbers.

Names and postal addresses are out of reach for rules: there is no checksum and no closed
list. Pass ``tagger=``, any callable ``text -> [(kind, start, end), ...]`` (for instance a
token-classification model with BIO labels, turned into spans by ``spans_from_bio``); its
spans are replaced like the others. zenlm ships no such model.

Boundaries are ASCII-only, so a number written flush against Chinese text (手机13800138000，)
is still found. Speed: the detailed patterns run only in windows around digits, ``@`` and
``::``, so text with few numbers (prose, dialogue) is scanned at tens of MB/s.
"""
from __future__ import annotations

import datetime
import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Protocol, Sequence

import phonenumbers
from phonenumbers import Leniency, PhoneNumberMatcher

# Most specific first: a later kind never claims characters an earlier one took.
KINDS = ("EMAIL", "IBAN", "CN_ID", "CARD", "SSN", "PASSPORT", "DRIVER_LICENSE", "IP", "PHONE")

# Regions whose national-form numbers are looked for (numbers with +CC are found for every country).
# The most populous countries and the largest economies; extend it for your data's countries.
DEFAULT_REGIONS = ("CN", "US", "GB", "IN", "DE", "FR", "JP", "BR", "RU", "IT", "ES", "CA", "AU", "KR",
                   "MX", "ID", "NL", "TR")

# --------------------------------------------------------------------------- tables
# SWIFT IBAN registry: total IBAN length per country.
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}

# Card brands: (name, IIN prefixes as "lo" or "lo-hi" ranges of equal length, allowed lengths).
# From the issuers' published IIN ranges (ISO/IEC 7812); a number must match a row to be a card.
CARD_BRANDS = (
    ("Visa", ("4",), (13, 16, 19)),
    ("Mastercard", ("51-55", "2221-2720"), (16,)),
    ("American Express", ("34", "37"), (15,)),
    ("Maestro", ("5018", "5020", "5038", "5893", "6304", "6759", "6761-6763", "676770", "676774"),
     tuple(range(12, 20))),
    ("Discover", ("6011", "644-649", "65", "622126-622925"), (16, 17, 18, 19)),
    ("UnionPay", ("62", "81"), (16, 17, 18, 19)),
    ("JCB", ("3528-3589",), (16, 17, 18, 19)),
    ("Diners Club", ("300-305", "3095", "36", "38-39"), tuple(range(14, 20))),
    ("Mir", ("2200-2204",), (16, 17, 18, 19)),
    ("RuPay", ("60", "65", "81", "82", "508", "353", "356"), (16,)),
    ("InterPayment", ("636",), (16, 17, 18, 19)),
    ("InstaPayment", ("637-639",), (16,)),
    ("Dankort", ("5019",), (16,)),
    ("Verve", ("506099-506198", "650002-650027", "507865-507964"), (16, 18, 19)),
    ("Troy", ("9792",), (16,)),
    ("UATP", ("1",), (15,)),
    ("Humo", ("9860",), (16,)),
    ("Uzcard", ("8600",), (16,)),
)

_PASSPORT_WORDS = r"passports?|passeport|pasaporte|passaporto|reisepass|paspoort|護照|护照|パスポート|여권"
_LICENSE_WORDS = (r"(?:driver'?s?|driving)\s+licen[cs]e|licen[cs]e|permis\s+de\s+conduire|führerschein|"
                  r"(?-i:DL)|驾驶证|驾照|駕駛執照|運転免許証?")
_PASSPORT_GATE = ("passport", "passeport", "pasaporte", "passaporto", "reisepass", "paspoort", "护照", "護照", "パスポート", "여권")
_LICENSE_GATE = ("licen", "permis", "führerschein", "驾驶证", "驾照", "駕駛執照", "運転免許")
_SSN_WORDS = r"ssn|social\s+security(?:\s+(?:number|no\.?|#))?"
_FILLER = r"(?:\s*(?:numbers?|nos?\.?|num\.?|nr\.?|n°|#|ids?|is|was|:|：|号码|號碼|号|號|编号|是|为)\s*){0,3}"


def _context(words: str, value: str) -> re.Pattern:
    return re.compile(rf"(?<![A-Za-z])(?:{words})(?![A-Za-z]){_FILLER}\s*(?P<value>{value})(?![A-Za-z0-9-])",
                      re.IGNORECASE)


_DOC_NUMBER = r"[A-Za-z0-9]{1,20}(?:-[A-Za-z0-9]{1,20}){0,4}|\d{2,4}(?: \d{2,4}){1,4}"
_PASSPORT = _context(_PASSPORT_WORDS, _DOC_NUMBER)
_LICENSE = _context(_LICENSE_WORDS, _DOC_NUMBER)
_SSN_BARE = _context(_SSN_WORDS, r"\d{3}[- ]?\d{2}[- ]?\d{4}")
# With hyphens only: "372 12 3456" is how phone numbers are written (+992 372 12 3456).
_SSN = re.compile(r"\d(?<![\w+-]\d)\d\d-\d{2}-\d{4}(?![\w-])")

# Patterns start with a character class, not a look-behind: re then skips ahead to candidate
# characters in C (2x faster); the look-behind is checked right after the first character.
_EMAIL = re.compile(r"[A-Za-z0-9](?<![A-Za-z0-9_.+-][A-Za-z0-9])[A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![A-Za-z0-9_-])")
_IBAN = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]){11,30}")
_CN_ID = re.compile(r"[1-9](?<![0-9A-Za-z][1-9])\d{5}(?:18|19|20)\d{2}\d{2}\d{2}\d{3}[0-9Xx](?![0-9A-Za-z])")
_CARD = re.compile(r"\d(?<![A-Za-z0-9-]\d)(?:[ -]?\d){11,18}(?![A-Za-z0-9])")
_IPV4 = re.compile(r"\d(?<![A-Za-z0-9_.]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?![A-Za-z0-9_]|\.\d|-[A-Za-z0-9])")
_IPV6 = re.compile(r"(?<![A-Za-z0-9_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:\d{1,3}\.){3}\d{1,3})(?![A-Za-z0-9_:])")
# Where a phone number could be: a run of digits with the separators people write between groups.
# Only a cheap superset for phonenumbers' matcher to look into, which decides what is a number.
_DIGIT_RUN = re.compile(r"[+＋(]?\d(?:[ \t\u00a0().\-\u2010-\u2015/]{0,3}\d){4,}")  # >= 5 digits
# Where any kind could be: the scan that decides which parts of a long text are looked at at all.
# (An IPv6 address has a decimal digit or "::" unless all its groups are letters a-f.)
_TRIGGER = re.compile(r"[\d@](?:[^\d@]{0,%d}[\d@])*|::" % (2 * 96))
_WINDOW = 96  # characters around a trigger; every kind's match plus its context word fits in it

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


def _expand_prefixes(ranges: Sequence[str]) -> list[tuple[int, int, int]]:
    out = []
    for r in ranges:
        lo, _, hi = r.partition("-")
        out.append((len(lo), int(lo), int(hi or lo)))
    return out


_BRAND_TABLE = [(name, _expand_prefixes(prefixes), frozenset(lengths)) for name, prefixes, lengths in CARD_BRANDS]


def card_brand(digits: str) -> Optional[str]:
    """The brand whose IIN prefix and length ``digits`` has (Luhn not checked), else None.
    Prefix and length together reject most digit runs that only happen to pass Luhn."""
    if not digits.isdigit():
        return None
    for name, prefixes, lengths in _BRAND_TABLE:
        if len(digits) in lengths and any(lo <= int(digits[:n]) <= hi for n, lo, hi in prefixes):
            return name
    return None


def _valid_card(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    if len(set(digits)) == 1:
        return False
    groups = re.split(r"[ -]", text)
    if len(groups) > 1:  # printed the way cards are: 4-4-4-4(-3), or Amex/Diners 4-6-5 / 4-6-4
        sizes = [len(g) for g in groups]
        fours = all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4
        if not (fours or sizes in ([4, 6, 5], [4, 6, 4])):
            return False
    if len(digits) == 18 and len(groups) == 1 and _has_birth_date(digits):  # an ID number with a bad check
        return False
    return card_brand(digits) is not None and luhn_valid(digits)


def iban_valid(iban: str) -> bool:
    """ISO 13616: the registry length for the country and mod-97 of the rearranged number is 1."""
    iban = iban.replace(" ", "").upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit() or not iban.isalnum():
        return False
    return int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1


def ssn_valid(number: str) -> bool:
    """SSA rules: area not 000, 666 or 900-999; group not 00; serial not 0000; and never the two
    numbers the SSA voided after they were printed in advertising (078-05-1120, 219-09-9999)."""
    digits = re.sub(r"[- ]", "", number)
    if len(digits) != 9 or not digits.isdigit():
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    return digits not in ("078051120", "219099999")


def _valid_doc_number(value: str) -> bool:
    alnum = re.sub(r"[^A-Za-z0-9]", "", value)
    return 5 <= len(alnum) <= 20 and sum(c.isdigit() for c in alnum) >= 4


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


# --------------------------------------------------------------------------- finders: text -> (start, end) spans
Span = tuple[int, int]


def _by_pattern(pattern: re.Pattern, ok: Callable[[str], bool], group: int | str = 0):
    def find(text: str) -> Iterator[Span]:
        for m in pattern.finditer(text):
            if ok(m.group(group)):
                yield m.span(group)
    return find


def _find_iban(text: str) -> Iterator[Span]:
    for m in _IBAN.finditer(text):
        want = IBAN_LENGTHS.get(m.group()[:2])
        if want is None:
            continue
        # take exactly the country's length (the pattern may run on into a following word)
        n, end = 0, m.start()
        while n < want and end < m.end():
            n += text[end] != " "
            end += 1
        candidate = text[m.start():end]
        solid = " " not in candidate
        grouped = re.fullmatch(r"[A-Z0-9]{4}(?: [A-Z0-9]{4})*(?: [A-Z0-9]{1,3})?", candidate)
        boundary = end == len(text) or not text[end].isalnum()
        if n == want and boundary and (solid or grouped) and iban_valid(candidate):
            yield m.start(), end


def _gated(find: Callable[[str], Iterable[Span]], words: Sequence[str], cased: Sequence[str] = ()):
    """``find`` run only on text that contains one of ``words`` (lower-case) or ``cased``: a
    substring test is ~10x faster than a case-insensitive pattern scan over text without them."""
    def gated(text: str) -> Iterable[Span]:
        lower = text.lower()
        if any(w in lower for w in words) or any(w in text for w in cased):
            return find(text)
        return ()
    return gated


def _find_ip(text: str) -> Iterator[Span]:
    if "." in text:
        yield from _by_pattern(_IPV4, _valid_ipv4)(text)
    if "::" in text or _HEX_COLON.search(text):
        yield from _by_pattern(_IPV6, _valid_ipv6)(text)


_HEX_COLON = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]")
_find_ssn_bare = _gated(_by_pattern(_SSN_BARE, ssn_valid, "value"), ("ssn", "social security"))


def _find_ssn(text: str) -> Iterator[Span]:
    yield from _by_pattern(_SSN, ssn_valid)(text)
    yield from _find_ssn_bare(text)


_DECIMAL = re.compile(r"\d+[.,]\d+")
_DECIMAL_RANGE = re.compile(r"\d\.\d+ ?[-\u2010-\u2015/] ?\d+\.\d|(?<![\d.])0\.\d")
_DATE_SHAPES = (re.compile(r"(\d{4})[-./](\d{1,2})[-./](\d{1,2})"), re.compile(r"(\d{1,2})[-./](\d{1,2})[-./](\d{4})"))


def _is_date(text: str) -> bool:
    """Starts with 2024-03-15, 15.03.2024, 03/15/2024: valid national phone numbers in several countries."""
    for shape in _DATE_SHAPES:
        m = shape.match(text.strip())
        if m:
            a, b, c = (int(x) for x in m.groups())
            year, x, y = (a, b, c) if len(m.group(1)) == 4 else (c, a, b)
            if 1800 <= year <= 2200 and ((1 <= x <= 12 and 1 <= y <= 31) or (1 <= y <= 12 and 1 <= x <= 31)):
                return True
    return False


class _PhoneFinder:
    """Phone numbers via phonenumbers' matcher, run only on digit runs that have enough digits."""

    def __init__(self, regions: Sequence[str]):
        self.regions = tuple(regions)
        self.min_digits = 5  # the shortest national numbers in the metadata (e.g. Niue, Tokelau)

    @staticmethod
    def _free_standing(text: str, s: int, e: int) -> bool:
        """Not a phone number: "#5092163" (an issue, order or sentence number), "INV-2002-482251" (part of
        a code), "-80.3421" / "150.0804" (a decimal), "15:30" (a time), "v1.2" (a version)."""
        before, after = text[max(0, s - 2):s], text[e:e + 2]
        if before.endswith("#") or (len(before) == 2 and before[1] in "-/." and before[0].isalnum()):
            return False
        if after[:1] == ":" or (len(after) == 2 and after[0] in "-/." and after[1].isalnum()):
            return False
        return not _DECIMAL.fullmatch(text[s:e])

    @classmethod
    def _plausible(cls, text: str, a: int, b: int) -> bool:
        """What the matcher took is not a date, a decimal, a range of decimals (95% CI 0.55-0.92) or
        a piece cut out of a longer number (the "07-5232" in "2766.07-5232.43")."""
        raw = text[a:b]
        return (cls._free_standing(text, a, b) and not _is_date(raw) and not _DECIMAL.fullmatch(raw)
                and not _DECIMAL_RANGE.search(raw))

    def __call__(self, text: str) -> Iterator[Span]:
        for run in _DIGIT_RUN.finditer(text):
            s, e = run.span()
            if sum(c.isdigit() for c in run.group()) < self.min_digits or not self._free_standing(text, s, e):
                continue
            # one character either side: the matcher rejects numbers glued to letters or after "$"
            lo, hi = max(0, s - 1), min(len(text), e + 1)
            window = text[lo:hi]
            regions = self.regions[:1] if run.group()[0] in "+＋" else self.regions
            found: dict[int, int] = {}
            for region in regions:
                for m in PhoneNumberMatcher(window, region, leniency=Leniency.VALID):
                    a, b = lo + m.start, lo + m.end
                    if b - a > found.get(a, 0) - a and self._plausible(text, a, b):
                        found[a] = b
            last = -1
            for a in sorted(found):
                if a >= last:
                    last = found[a]
                    yield a, last


def _windows(text: str) -> list[Span]:
    """Stretches of ``text`` that hold a digit, an '@' or an IPv6 colon, widened by _WINDOW and merged."""
    out: list[list[int]] = []
    for m in _TRIGGER.finditer(text):
        lo, hi = max(0, m.start() - _WINDOW), min(len(text), m.end() + _WINDOW)
        if out and lo <= out[-1][1]:
            out[-1][1] = hi
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


# --------------------------------------------------------------------------- model hook
class SpanTagger(Protocol):
    """A model that finds what rules cannot (names, addresses): ``text -> [(kind, start, end), ...]``
    with character offsets into ``text`` and kinds like ``"PERSON"``, ``"ADDRESS"``."""

    def __call__(self, text: str) -> Iterable[tuple[str, int, int]]: ...


def spans_from_bio(offsets: Sequence[tuple[int, int]], labels: Sequence[str]) -> list[tuple[str, int, int]]:
    """Character spans from a token classifier's BIO labels (``B-PER``, ``I-PER``, ``O``) and the
    tokens' character offsets (a fast tokenizer's ``offsets``), for use as a ``SpanTagger``.
    An ``I-`` that does not continue a span of its kind starts one, as seqeval does."""
    if len(offsets) != len(labels):
        raise ValueError(f"{len(offsets)} offsets but {len(labels)} labels")
    spans: list[list] = []
    open_kind = None
    for (start, end), label in zip(offsets, labels):
        if label == "O" or start == end:
            open_kind = None if label == "O" else open_kind
            continue
        tag, sep, kind = label.partition("-")
        if not sep or tag not in ("B", "I") or not kind:
            raise ValueError(f"label {label!r} is not O, B-KIND or I-KIND")
        if tag == "I" and open_kind == kind:
            spans[-1][2] = end
        else:
            spans.append([kind, start, end])
            open_kind = kind
    return [tuple(s) for s in spans]


# --------------------------------------------------------------------------- finding and replacing
@dataclass(frozen=True)
class PIIMatch:
    kind: str
    start: int
    end: int
    text: str


def _check_kinds(kinds: Optional[Iterable[str]]) -> tuple[str, ...]:
    if kinds is None:
        return KINDS
    if isinstance(kinds, str):
        raise ValueError(f"kinds must be a list of kind names, got the string {kinds!r}")
    kinds = set(kinds)
    bad = sorted(k for k in kinds if k not in KINDS)
    if bad:
        raise ValueError(f"unknown PII kind {bad[0]!r}; valid: {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in kinds)  # always in KINDS order: most specific first


def _check_regions(regions: Optional[Iterable[str]]) -> tuple[str, ...]:
    if regions is None:
        return DEFAULT_REGIONS
    if isinstance(regions, str):
        raise ValueError(f"regions must be a list of region codes, got the string {regions!r}")
    regions = tuple(regions)
    for r in regions:
        if r not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {r!r}: use ISO 3166 codes phonenumbers supports, "
                             f"e.g. 'CN', 'US', 'GB' (phonenumbers.SUPPORTED_REGIONS)")
    if not regions:
        raise ValueError("regions is empty: give at least one region, e.g. ['US']")
    return regions


_TAGGER_KIND = re.compile(r"[A-Z][A-Z0-9_]*")


class PIIScrubber:
    """A reusable pipeline step: ``scrubber(text) -> text``; ``scrubber.counts`` tallies what it
    replaced, by kind, so a data report can say how much personal data was removed.

    ``kinds``: which of ``KINDS`` to look for (default all); ``regions``: ISO codes of the
    countries whose national-form phone numbers to look for (default ``DEFAULT_REGIONS``);
    ``tagger``: an optional ``SpanTagger`` for names and addresses; ``placeholder``: a format
    string with ``{kind}``."""

    def __init__(self, kinds: Optional[Iterable[str]] = None, placeholder: str = "<{kind}>",
                 regions: Optional[Iterable[str]] = None, tagger: Optional[SpanTagger] = None):
        self.kinds = _check_kinds(kinds)
        self.regions = _check_regions(regions)
        if "{kind}" not in placeholder:
            raise ValueError(f"placeholder {placeholder!r} must contain {{kind}}, so the text says what was removed")
        if tagger is not None and not callable(tagger):
            raise ValueError(f"tagger must be callable text -> [(kind, start, end)], got {tagger!r}")
        self.placeholder = placeholder
        self.tagger = tagger
        self.counts: Counter = Counter()
        finders = {
            "EMAIL": _gated(_by_pattern(_EMAIL, lambda t: True), ("@",)), "IBAN": _find_iban,
            "CN_ID": _by_pattern(_CN_ID, valid_cn_id), "CARD": _by_pattern(_CARD, _valid_card),
            "SSN": _find_ssn,
            "PASSPORT": _gated(_by_pattern(_PASSPORT, _valid_doc_number, "value"), _PASSPORT_GATE),
            "DRIVER_LICENSE": _gated(_by_pattern(_LICENSE, _valid_doc_number, "value"), _LICENSE_GATE, ("DL",)),
            "IP": _find_ip, "PHONE": _PhoneFinder(self.regions),
        }
        self._finders = [(k, finders[k]) for k in self.kinds]

    def find(self, text: str) -> list[PIIMatch]:
        """Non-overlapping PII spans in ``text``, in order."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        taken: list[tuple[int, int, str]] = []
        for lo, hi in _windows(text):
            chunk = text[lo:hi]
            local: list[tuple[int, int, str]] = []
            for kind, find in self._finders:
                for a, b in find(chunk):
                    if all(b <= s or a >= e for s, e, _ in local):
                        local.append((a, b, kind))
            taken += [(lo + a, lo + b, k) for a, b, k in local]
        if self.tagger is not None:
            for kind, a, b in self._tagged(text):
                if all(b <= s or a >= e for s, e, _ in taken):
                    taken.append((a, b, kind))
        return [PIIMatch(k, a, b, text[a:b]) for a, b, k in sorted(taken)]

    def _tagged(self, text: str) -> Iterator[tuple[str, int, int]]:
        for span in self.tagger(text):
            try:
                kind, a, b = span
            except (TypeError, ValueError):
                raise ValueError(f"tagger returned {span!r}; expected (kind, start, end)") from None
            if not (isinstance(kind, str) and _TAGGER_KIND.fullmatch(kind)):
                raise ValueError(f"tagger returned kind {kind!r}; expected an upper-case name like 'PERSON'")
            if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b <= len(text)):
                raise ValueError(f"tagger returned span ({a!r}, {b!r}) outside text of length {len(text)}")
            yield kind, a, b

    def __call__(self, text: str) -> str:
        matches = self.find(text)
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


_DEFAULT: Optional[PIIScrubber] = None


def _scrubber(kinds, regions, placeholder="<{kind}>") -> PIIScrubber:
    global _DEFAULT
    if kinds is None and regions is None and placeholder == "<{kind}>":
        if _DEFAULT is None:
            _DEFAULT = PIIScrubber()
        return _DEFAULT
    return PIIScrubber(kinds, placeholder, regions)


def find_pii(text: str, kinds: Optional[Iterable[str]] = None,
             regions: Optional[Iterable[str]] = None) -> list[PIIMatch]:
    """Non-overlapping PII spans in ``text``, in order. Kinds are tried in the order of
    ``KINDS`` (most specific first), and a later kind never claims characters an earlier one took."""
    return _scrubber(kinds, regions).find(text)


def scrub(text: str, kinds: Optional[Iterable[str]] = None, placeholder: str = "<{kind}>",
          regions: Optional[Iterable[str]] = None) -> str:
    """``text`` with every PII span replaced by ``placeholder`` formatted with its kind."""
    scrubber = _scrubber(kinds, regions, placeholder)
    matches = scrubber.find(text)
    out, last = [], 0
    for m in matches:
        out.append(text[last:m.start])
        out.append(placeholder.format(kind=m.kind))
        last = m.end
    out.append(text[last:])
    return "".join(out)


def scrub_stream(texts: Iterable[str], kinds: Optional[Iterable[str]] = None,
                 placeholder: str = "<{kind}>", regions: Optional[Iterable[str]] = None) -> Iterator[str]:
    """Lazily scrub an iterable of texts (lines, documents): one in, one out, nothing held in memory."""
    return PIIScrubber(kinds, placeholder, regions).stream(texts)


__all__ = ["KINDS", "DEFAULT_REGIONS", "CARD_BRANDS", "IBAN_LENGTHS", "PIIMatch", "PIIScrubber", "SpanTagger",
           "card_brand", "find_pii", "iban_valid", "luhn_valid", "scrub", "scrub_stream", "spans_from_bio",
           "ssn_valid", "valid_cn_id"]
