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
  number 1.2.3.4.5, not right after "version", "v" or "EC") and IPv6 (validated by the standard library's ``ipaddress``).
* ``PHONE``  phone numbers of every country through ``phonenumbers`` (Google's
  libphonenumber): numbers written with ``+``/``00`` and a country code are found whatever
  the region; numbers in national form (``07700 900123``, ``010-62751234``) only for the
  ``regions`` you list, because a national number is just digits: ``2024-03-15`` is a valid
  phone number in ten countries, so listing all 245 regions flags dates and order numbers.
  After a phone word ("Tel.", "phone", "call", "mobile", "fax", "电话", "拨打", "☎" ...) national
  forms of every region are tried. Kept numbers start with a digit, '+' or a bracket, and are not
  dates, decimals, ranges of decimals or of years, percentages, or glued to letters or '#'.

Names and postal addresses are out of reach for rules: there is no checksum and no closed
list. Pass ``tagger=``, any callable ``text -> [(kind, start, end), ...]`` (for instance a
token-classification model with BIO labels, turned into spans by ``spans_from_bio``); its
spans are replaced like the others. zenlm ships no such model.

Boundaries are ASCII-only, so a number written flush against Chinese text (手机13800138000，)
is still found. Speed: one scan finds each kind's necessary trigger (``_triggers``: '@', runs
of >= 5 / 9 / 12 / 17 digits, dotted quads, IBAN heads, two colons, context words), and each
finder runs only in windows around its own triggers; phonenumbers' matcher is called only for
digit runs that could still yield a kept number, and only for regions whose shortest number
fits. ``PIIScrubber(fast=False)`` runs every finder over the whole text and gives the same spans.

Why it is one long module: every kind's finder and validity rule (and the per-country tables they
read) feed one trigger scan and one overlap resolution; the length is the list of kinds, each short.
"""
from __future__ import annotations

import bisect
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


# A dotted quad right after "version", "v" or "EC" (an enzyme number) is not an address: "version 18.14.7.18".
_NOT_AN_ADDRESS = re.compile(r"(?:(?<![A-Za-z])(?:v|ver\.?|version|release|build|EC)\s*)$", re.IGNORECASE)


def _find_ip(text: str) -> Iterator[Span]:
    if "." in text:
        for m in _IPV4.finditer(text):
            if _valid_ipv4(m.group()) and not _NOT_AN_ADDRESS.search(text, max(0, m.start() - 12), m.start()):
                yield m.span()
    if "::" in text or _HEX_COLON.search(text):
        yield from _by_pattern(_IPV6, _valid_ipv6)(text)


_HEX_COLON = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]")
_find_ssn_bare = _gated(_by_pattern(_SSN_BARE, ssn_valid, "value"), ("ssn", "social security"))


_DECIMAL = re.compile(r"\d+[.,]\d+")
_DECIMAL_RANGE = re.compile(r"\d\.\d+ ?[-\u2010-\u2015/] ?\d+\.\d|(?<![\d.])0\.\d")
_DATE_SHAPES = (re.compile(r"(\d{4})[-./](\d{1,2})[-./](\d{1,2})"), re.compile(r"(\d{1,2})[-./](\d{1,2})[-./](\d{4})"))


_YEAR_RANGE = re.compile(r"[(\[]?((?:1[89]|20)\d\d) ?[-\u2010-\u2015/] ?(\d\d|(?:1[89]|20)\d\d)[)\]]?")


def _is_year_range(text: str) -> bool:
    """1984-2008, (2005-06), 1964-76: a second year after the first."""
    m = _YEAR_RANGE.fullmatch(text)
    if not m:
        return False
    first, second = m.group(1), m.group(2)
    return int(second) > int(first[-len(second):]) if len(second) == 2 else int(second) > int(first)


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


# What a phone number the matcher found may start and end with (it never takes "." or a letter there).
_PHONE_FIRST = "+＋(（[［"
_PHONE_LAST = ")）]］"

# A word that says the next number is a phone number: then national numbers of every region are tried.
_PHONE_CONTEXT = re.compile(
    r"(?:(?<![A-Za-z])(?:tel|tél|tlf|ph|phone|telephone|téléphone|teléfono|telefone|telefono|telefon|call|mobile|"
    r"cell|cellphone|fax|whatsapp|handy|móvil|portable)(?![A-Za-z])|电话|電話|手机|手機|座机|致电|拨打|撥打|传真|傳真|"
    r"☎|📞|℡)[^\d\n]{0,16}$", re.IGNORECASE)
_ALL_REGIONS = tuple(sorted(phonenumbers.SUPPORTED_REGIONS))


def _nsn_min(code: int) -> int:
    """The shortest national significant number of any region (or non-geographic entity) of a country code."""
    meta = phonenumbers.PhoneMetadata
    lengths = [n for r in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(code, ())
               for m in [meta.metadata_for_nongeo_region(code) if r == "001" else meta.metadata_for_region(r)]
               if m is not None for n in m.general_desc.possible_length if n > 0]
    return min(lengths, default=1)


def _min_digits(region: str) -> int:
    """Fewest digits a valid number can have when the matcher is run for ``region`` on text without '+':
    a national significant number of its country code, or the region's international prefix (its
    shortest form) + any country code + that code's shortest national number."""
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
    idd = re._parser.parse(meta.international_prefix).getwidth()[0] if meta.international_prefix else 99
    any_code = min(len(str(c)) + _nsn_min(c) for c in phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
    return min(_nsn_min(meta.country_code), idd + any_code)


class _PhoneFinder:
    """Phone numbers via phonenumbers' matcher, run only on digit runs that have enough digits.

    ``fast`` (the default) skips, before calling the matcher, what cannot end in a kept number: a run
    in which no stretch from a free-standing start to a free-standing end would pass ``_plausible``
    (decimals, ranges of decimals, "0.737-0.933"), and regions whose shortest valid number has more
    digits than the longest such stretch ("195 (97.5": 5 digits, tried in DE, AU, KR, NL, not in US). Both are exact: the spans are the same as with ``fast=False``
    (tests/test_privacy.py compares them on generated and real text)."""

    def __init__(self, regions: Sequence[str], context_regions: Sequence[str] = _ALL_REGIONS, fast: bool = True):
        self.regions = tuple(regions)
        self.context_regions = tuple(r for r in context_regions if r not in self.regions)
        self.fast = fast
        self.min_digits = 5  # the shortest national numbers in the metadata (e.g. Niue, Tokelau) + a margin
        self._need = {r: _min_digits(r) for r in self.regions + self.context_regions}

    @staticmethod
    def _free_standing(text: str, s: int, e: int) -> bool:
        """Not a phone number: "#5092163" (an issue, order or sentence number), "INV-2002-482251" (part of
        a code), "-80.3421" / "150.0804" (a decimal), "15:30" (a time), "v1.2" (a version)."""
        return _free_start(text, s) and _free_end(text, e) and not _DECIMAL.fullmatch(text[s:e])

    @classmethod
    def _plausible(cls, text: str, a: int, b: int) -> bool:
        """What the matcher took starts with a digit, '+' or an opening bracket and ends with a digit or a
        closing bracket, and is not a date, a decimal, a range of decimals (95% CI 0.55-0.92), a range
        of years ("1984-2008", "(2005-06)"), a percentage, a version ("version 18.14.7"), or a piece
        cut out of a longer number (the "07-5232" in "2766.07-5232.43")."""
        raw = text[a:b]
        return ((raw[0] in _PHONE_FIRST or raw[0].isdigit()) and (raw[-1] in _PHONE_LAST or raw[-1].isdigit())
                and cls._free_standing(text, a, b)
                and not _NOT_AN_ADDRESS.search(text, max(0, a - 12), a)
                and not _is_date(raw) and not _DECIMAL.fullmatch(raw) and not _DECIMAL_RANGE.search(raw)
                and not _is_year_range(raw))

    @classmethod
    def _keepable_digits(cls, text: str, lo: int, hi: int) -> int:
        """The most digits in a stretch of text[lo:hi] that starts and ends on a non-space character and
        passes ``_plausible`` (0: none does). A number the matcher finds is kept only if it passes
        ``_plausible``, so it has at most this many digits."""
        counts = [0]
        for c in text[lo:hi]:
            counts.append(counts[-1] + c.isdigit())
        starts = [a for a in range(lo, hi)
                  if (text[a] in _PHONE_FIRST or text[a].isdigit()) and _free_start(text, a)]
        ends = [b for b in range(hi, lo, -1)
                if (text[b - 1] in _PHONE_LAST or text[b - 1].isdigit()) and _free_end(text, b)]
        best = 0
        for a in starts:
            for b in ends:  # longest first: the first plausible end has the most digits for this start
                digits = counts[b - lo] - counts[a - lo]
                if digits <= best:
                    break
                if cls._plausible(text, a, b):
                    best = digits
                    break
        return best

    def __call__(self, text: str) -> Iterator[Span]:
        for run in _DIGIT_RUN.finditer(text):
            s, e = run.span()
            n = sum(c.isdigit() for c in run.group())
            if n < self.min_digits or not self._free_standing(text, s, e):
                continue
            # one character either side: the matcher rejects numbers glued to letters or after "$"
            lo, hi = max(0, s - 1), min(len(text), e + 1)
            window = text[lo:hi]
            most = n
            if self.fast:
                most = self._keepable_digits(text, lo, hi)
                if not most:
                    continue
                if "+" in window or "＋" in window:
                    most = n + 99  # "+(44) 20 ...": the region's minimum does not apply
            if run.group()[0] in "+＋":
                tiers = (self.regions[:1],)
            elif self.context_regions and _PHONE_CONTEXT.search(text, max(0, s - 40), s):
                tiers = (self.regions, self.context_regions)  # "Tel. 0490 75 40 81": every region's national form
            else:
                tiers = (self.regions,)
            found: dict[int, int] = {}
            for regions in tiers:
                for region in regions:
                    if self.fast and most < self._need[region]:
                        continue
                    for m in PhoneNumberMatcher(window, region, leniency=Leniency.VALID):
                        a, b = lo + m.start, lo + m.end
                        if b - a > found.get(a, 0) - a and self._plausible(text, a, b):
                            found[a] = b
            last = -1
            for a in sorted(found):
                if a >= last:
                    last = found[a]
                    yield a, last


_ASCII_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _free_start(text: str, s: int) -> bool:
    """Nothing glued before position s: not after a digit, an ASCII letter or '#', nor after '-', '/' or '.' that follows a
    letter or digit."""
    if s >= 1 and (text[s - 1] == "#" or text[s - 1].isdigit() or text[s - 1] in _ASCII_LETTERS):
        return False
    return not (s >= 2 and text[s - 1] in "-/." and text[s - 2].isalnum())


def _free_end(text: str, e: int) -> bool:
    """Nothing glued after position e: not before a digit, an ASCII letter, ':' or '%', nor before '-', '/' or '.' followed by a letter
    or digit."""
    if e < len(text) and (text[e] in ":%‰" or text[e].isdigit() or text[e] in _ASCII_LETTERS):
        return False
    return not (e + 1 < len(text) and text[e] in "-/." and text[e + 1].isalnum())


# --------------------------------------------------------------------------- where to look
# One pass over the text finds where each kind could be; each finder then runs only in windows
# around its own triggers. A trigger is a necessary condition of a match of its kind:
#   EMAIL '@'; IPv6 two colons with <= 4 hex digits between; IBAN two capitals and two digits;
#   a run of digits (the separators phone numbers use, <= 3 between digits) of n digits: PHONE n >= 5,
#   SSN n >= 9, CARD n >= 12, CN_ID n >= 17, IPv4 three dots. Runs right after '#' (sentence, issue,
#   order numbers: "#538123") only count with a separator inside or >= 9 digits: a phone number is
#   never taken after '#', and every other digit kind needs a separator or 9 digits.
#   PASSPORT, DRIVER_LICENSE and SSN without hyphens: their context word.
_SEP = r"[ \t\u00a0().\-\u2010-\u2015/]"
# A '#' and the digits after it are taken whole (possessive), so that re does not start again at
# each digit of "#538123"; a plain run needs 4+ digits (IPv4); the kinds are sorted out in Python.
_NUM_TRIGGER = re.compile(r"[#\d](?:(?<=#)\d++(?:%s{1,3}+\d++)*+|(?<=\d)(?:%s{0,3}\d){3,})" % (_SEP, _SEP))
_IBAN_TRIGGER = re.compile(r"[A-Z][A-Z]\d\d")
_ANY_DIGIT = re.compile(r"\d")
_SPARSE_DIGITS = 2000  # more digits than this: IBAN heads and context words are looked for everywhere
_IPV6_TRIGGER = re.compile(r":[0-9A-Fa-f]{0,4}:")
_NUM_KINDS = (("PHONE", 5), ("SSN", 9), ("CARD", 12), ("CN_ID", 17))
_CONTEXT_WORDS = {"PASSPORT": _PASSPORT_GATE, "DRIVER_LICENSE": _LICENSE_GATE, "SSN_BARE": ("ssn", "social security")}
_CONTEXT_TRIGGER = re.compile("|".join(re.escape(w) for words in _CONTEXT_WORDS.values() for w in words))
_CONTEXT_KIND = {w: k for k, words in _CONTEXT_WORDS.items() for w in words}
_WINDOW = 96  # characters around a trigger; every kind's match plus its context word fits in it
_CONTEXT_SPAN = (48, 256)  # before / after a context word: "driver's " + filler + a 104-character value


def _triggers(text: str, kinds: Iterable[str]) -> dict[str, list[Span]]:
    """Trigger spans per finder name (kinds, plus SSN_BARE for SSNs after the word)."""
    kinds = set(kinds)
    out: dict[str, list[Span]] = {k: [] for k in kinds | {"SSN_BARE"}}
    if "EMAIL" in kinds and "@" in text:
        i = text.find("@")
        while i >= 0:
            out["EMAIL"].append((i, i + 1))
            i = text.find("@", i + 1)
    if "IP" in kinds and ":" in text:
        out["IP"] += [m.span() for m in _IPV6_TRIGGER.finditer(text)]
    # Every other kind has digits (IBAN 2, IPv4 4, documents 4, the rest 5+). Where digits are few
    # (prose), IBAN heads and context words are looked for only in the 256 characters before each digit.
    where: list[Span] = []
    for count, m in enumerate(_ANY_DIGIT.finditer(text)):
        if count > _SPARSE_DIGITS:
            where = [(0, len(text))]
            break
        lo, hi = max(0, m.start() - 256), min(len(text), m.end() + 16)
        if where and lo <= where[-1][1]:
            where[-1] = (where[-1][0], hi)
        else:
            where.append((lo, hi))
    if not where:
        return out
    if "IBAN" in kinds:
        for lo, hi in where:
            out["IBAN"] += [m.span() for m in _IBAN_TRIGGER.finditer(text, lo, hi)]
    num_kinds = [(k, n) for k, n in _NUM_KINDS if k in kinds]
    if num_kinds or "IP" in kinds:
        for m in _NUM_TRIGGER.finditer(text):
            run = m.group()
            if run[0] == "#" and len(run) < 10 and run[1:].isdigit():
                continue  # "#538123": no separator and < 9 digits
            digits = sum(c.isdigit() for c in run)
            for kind, need in num_kinds:
                if digits >= need:
                    out[kind].append(m.span())
            if "IP" in kinds and run.count(".") >= 3:
                out["IP"].append(m.span())
    wanted = {k for k in _CONTEXT_WORDS if (k if k != "SSN_BARE" else "SSN") in kinds}
    if wanted:
        for lo, hi in where:
            lower = text[lo:hi].lower()
            if len(lower) != hi - lo:  # a character whose lower case is longer: positions would shift
                for k in wanted:
                    out[k].append((lo, hi))
                continue
            for m in _CONTEXT_TRIGGER.finditer(lower):
                if _CONTEXT_KIND[m.group()] in wanted:
                    out[_CONTEXT_KIND[m.group()]].append((lo + m.start(), lo + m.end()))
        if "DRIVER_LICENSE" in wanted:  # the abbreviation, in capitals only
            i = text.find("DL")
            while i >= 0:
                out["DRIVER_LICENSE"].append((i, i + 2))
                i = text.find("DL", i + 1)
    return out


def _windows(text: str, spans: Iterable[Span], before: int = _WINDOW, after: int = _WINDOW) -> list[Span]:
    """``spans`` widened by ``before``/``after`` characters, moved out to the next whitespace (at most 64
    characters further, so that no window edge cuts a number or a word in two) and merged."""
    out: list[list[int]] = []
    n = len(text)
    for s, e in sorted(spans):
        lo, hi = max(0, s - before), min(n, e + after)
        stop = max(0, lo - 64)
        while lo > stop and not text[lo - 1].isspace():
            lo -= 1
        stop = min(n, hi + 64)
        while hi < stop and not text[hi].isspace():
            hi += 1
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
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
    string with ``{kind}``; ``fast=False``: run every finder over the whole text (the reference the
    windowed, pre-filtered default must agree with, span for span)."""

    def __init__(self, kinds: Optional[Iterable[str]] = None, placeholder: str = "<{kind}>",
                 regions: Optional[Iterable[str]] = None, tagger: Optional[SpanTagger] = None, fast: bool = True):
        self.kinds = _check_kinds(kinds)
        self.regions = _check_regions(regions)
        if "{kind}" not in placeholder:
            raise ValueError(f"placeholder {placeholder!r} must contain {{kind}}, so the text says what was removed")
        if tagger is not None and not callable(tagger):
            raise ValueError(f"tagger must be callable text -> [(kind, start, end)], got {tagger!r}")
        self.placeholder = placeholder
        self.tagger = tagger
        self.counts: Counter = Counter()
        self.fast = bool(fast)
        finders = {
            "EMAIL": _gated(_by_pattern(_EMAIL, lambda t: True), ("@",)), "IBAN": _find_iban,
            "CN_ID": _by_pattern(_CN_ID, valid_cn_id), "CARD": _by_pattern(_CARD, _valid_card),
            "SSN": _by_pattern(_SSN, ssn_valid), "SSN_BARE": _find_ssn_bare,
            "PASSPORT": _gated(_by_pattern(_PASSPORT, _valid_doc_number, "value"), _PASSPORT_GATE),
            "DRIVER_LICENSE": _gated(_by_pattern(_LICENSE, _valid_doc_number, "value"), _LICENSE_GATE, ("DL",)),
            "IP": _find_ip, "PHONE": _PhoneFinder(self.regions, fast=self.fast),
        }
        order = [(k, k) for k in self.kinds] + ([("SSN_BARE", "SSN")] if "SSN" in self.kinds else [])
        self._finders = sorted(((name, kind, finders[name]) for name, kind in order), key=lambda f: KINDS.index(f[1]))

    def find(self, text: str) -> list[PIIMatch]:
        """Non-overlapping PII spans in ``text``, in order."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        taken: list[tuple[int, int, str]] = []  # sorted by start, never overlapping

        def take(a: int, b: int, kind: str) -> None:
            i = bisect.bisect_left(taken, (a,))
            if (i == 0 or taken[i - 1][1] <= a) and (i == len(taken) or taken[i][0] >= b):
                taken.insert(i, (a, b, kind))

        if self.fast:  # each finder only in the windows around its own triggers
            triggers = _triggers(text, self.kinds)
            for name, kind, find in self._finders:
                if not triggers[name]:
                    continue
                context = name in ("PASSPORT", "DRIVER_LICENSE", "SSN_BARE")
                for lo, hi in _windows(text, triggers[name], *(_CONTEXT_SPAN if context else (_WINDOW, _WINDOW))):
                    for a, b in list(find(text[lo:hi])):
                        take(lo + a, lo + b, kind)
        else:  # the plain path: every finder over the whole text
            for name, kind, find in self._finders:
                for a, b in list(find(text)):
                    take(a, b, kind)
        if self.tagger is not None:
            for kind, a, b in self._tagged(text):
                take(a, b, kind)
        return [PIIMatch(k, a, b, text[a:b]) for a, b, k in taken]

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
