"""Precision and recall of zenlm.privacy on labelled text it was not written against, false alarms on
real corpora, and scrubbing speed.

    .venv/bin/python benchmarks/eval_privacy.py [--seed 0] [--all-regions] [--show 8]

Why generated and not hand-written: the scrubber's own test set was written together with its
patterns and scored 1.00. Here the positives come from sources the scrubber does not consult:
phone numbers from libphonenumber's example numbers for all 245 regions (plus a random valid
neighbour of each), written in its E164, INTERNATIONAL and NATIONAL formats; IBANs from the
registry's BBAN structures (table below) with computed check digits; card numbers from the card
networks' IIN table (a separate, smaller table below) with computed Luhn digits; SSNs drawn under
the SSA rules. The negatives are the numbers text is full of: dates, times, versions, amounts,
ISBNs (computed checks), order/invoice/tracking numbers, coordinates, and near misses (a wrong
IBAN check, SSNs the SSA never issues, passport-shaped codes with no context word).
Real text (tinyshakespeare, Tatoeba, SciFact abstracts; ../shared/data) has no labels: every span
flagged there is listed so a reader can judge it; on such text nearly every flag is a false alarm.
Speed: the current scrubber and the one of BEFORE_COMMIT (from git) are timed alternately in one
process, so that load from other jobs on a shared machine hits both alike; the CPU line says where.
The fast path (triggers, windows, matcher pre-filter) is checked span for span against
PIIScrubber(fast=False) on every generated line and on each real text in full.
"""
from __future__ import annotations

import argparse
import gzip
import ipaddress
import json
import random
import re
import subprocess
import sys
import time
import types
from collections import Counter, defaultdict
from pathlib import Path

import phonenumbers as pn

from zenlm import privacy
from zenlm.privacy import DEFAULT_REGIONS, KINDS, PIIScrubber

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OLD_SET = Path(__file__).resolve().parents[1] / "tests" / "data" / "pii_labelled.jsonl"

FRAMES = [
    "Call me on {}.", "Tel. {} (office hours)", "电话：{}，谢谢。", "Rufen Sie mich unter {} an.",
    "Mon numéro : {}", "Mi número es {} si necesitas algo.", "Contact: {}", "请拨打{}联系客服",
    "Reach the front desk at {} or by mail.",
]
# The frames that name the telephone ("call", "tel.", 电话 telephone, 拨打 dial); the others say only
# "number", "contact", "reach" or nothing. Used to label groups, not to generate anything.
PHONE_WORD_FRAMES = {"Call me on {}.", "Tel. {} (office hours)", "电话：{}，谢谢。", "请拨打{}联系客服"}
PHONE_TYPES = (pn.PhoneNumberType.MOBILE, pn.PhoneNumberType.FIXED_LINE)
PHONE_FORMATS = {"E164": pn.PhoneNumberFormat.E164, "INTERNATIONAL": pn.PhoneNumberFormat.INTERNATIONAL,
                 "NATIONAL": pn.PhoneNumberFormat.NATIONAL}

# IBAN registry (SWIFT, release 98): BBAN structure per country, n digits, a upper-case letters, c alphanumerics.
BBAN = {
    "AL": "8n16c", "AT": "16n", "BE": "12n", "BG": "4a6n8c", "BR": "23n1a1c", "CH": "5n12c", "CY": "8n16c",
    "CZ": "20n", "DE": "18n", "DK": "14n", "EE": "16n", "ES": "20n", "FI": "14n", "FR": "10n11c2n",
    "GB": "4a14n", "GR": "7n16c", "HR": "17n", "HU": "24n", "IE": "4a14n", "IL": "19n", "IS": "22n",
    "IT": "1a10n12c", "KW": "4a22c", "LT": "16n", "LU": "3n13c", "LV": "4a13c", "MT": "4a5n18c",
    "NL": "4a10n", "NO": "11n", "PL": "24n", "PT": "21n", "RO": "4a16c", "SA": "2n18c", "SE": "20n",
    "SI": "15n", "SK": "20n", "TR": "5n1n16c", "UA": "6n19c",
}
# Card networks' IIN prefixes and lengths (Wikipedia, "Payment card number", 2024), a subset.
CARDS = [("visa", ["4"], [16, 13]), ("mastercard", ["51", "52", "53", "54", "55", "2221", "2500", "2720"], [16]),
         ("amex", ["34", "37"], [15]), ("discover", ["6011", "644", "649", "65"], [16]), ("jcb", ["3528", "3589"], [16]),
         ("unionpay", ["62"], [16, 17, 18, 19]), ("diners", ["36", "300", "305"], [14]), ("mir", ["2200", "2204"], [16]),
         ("maestro", ["5018", "5020", "5038", "6304", "6759", "6761", "6763"], [12, 13, 16, 19])]


def luhn_digit(body: str) -> str:
    total = 0
    for i, d in enumerate(reversed(body)):
        n = int(d) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return str((10 - total % 10) % 10)


def iban(rng: random.Random, country: str) -> str:
    pools = {"n": "0123456789", "a": "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "c": "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"}
    bban = "".join(rng.choice(pools[t]) for n, t in re.findall(r"(\d+)([nac])", BBAN[country]) for _ in range(int(n)))
    rearranged = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    return f"{country}{98 - int(rearranged) % 97:02d}{bban}"


def isbn13(rng: random.Random) -> str:
    body = "978" + "".join(rng.choice("0123456789") for _ in range(9))
    check = (10 - sum(int(d) * (1 if i % 2 == 0 else 3) for i, d in enumerate(body)) % 10) % 10
    return f"{body[:3]}-{body[3]}-{body[4:8]}-{body[8:]}-{check}"


def cn_id(rng: random.Random) -> str:
    birth = f"{rng.randint(1940, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    body = rng.choice(["110105", "310104", "440301", "510107", "330106"]) + birth + f"{rng.randint(0, 999):03d}"
    weights = [2 ** (17 - i) % 11 for i in range(17)]
    return body + "10X98765432"[sum(int(d) * w for d, w in zip(body, weights)) % 11]


# --------------------------------------------------------------------------- the labelled set
def labelled_set(seed: int) -> list[dict]:
    """Rows {text, pii: [(kind, text)], group}: group names the source of positives or the kind of negative."""
    rng = random.Random(seed)
    rows = []

    def add(group, frame, value, kind=None):
        rows.append({"text": frame.format(value), "pii": [(kind, value)] if kind else [], "group": group})

    for region in sorted(pn.SUPPORTED_REGIONS):
        for ptype in PHONE_TYPES:
            example = pn.example_number_for_type(region, ptype)
            if example is None:
                continue
            numbers = [example]
            national = str(example.national_number)
            for _ in range(20):  # a random valid neighbour: same leading digits, new last four
                n = pn.parse(f"+{example.country_code}{national[:-4]}{rng.randint(0, 9999):04d}")
                if n != example and pn.is_valid_number(n) and pn.region_code_for_number(n) == region:
                    numbers.append(n)
                    break
            for number in numbers:
                for fmt_name, fmt in PHONE_FORMATS.items():
                    frame = rng.choice(FRAMES)
                    if fmt_name == "NATIONAL":
                        fmt_name += "/in-regions" if region in DEFAULT_REGIONS else "/other-regions"
                        if region not in DEFAULT_REGIONS:  # the frame's own words, not the scrubber's list
                            fmt_name += ", phone word" if frame in PHONE_WORD_FRAMES else ", no phone word"
                    add(f"PHONE {fmt_name}", frame, pn.format_number(number, fmt), "PHONE")
    for country in BBAN:
        for _ in range(3):
            value = iban(rng, country)
            add("IBAN electronic", "Please pay to {} by Friday.", value, "IBAN")
            add("IBAN print", "IBAN: {}", " ".join(value[i:i + 4] for i in range(0, len(value), 4)), "IBAN")
            bad = value[:-1] + str((int(value[-1], 36) + 1) % 10)  # one character changed: check fails
            add("neg IBAN bad check", "Please pay to {} by Friday.", bad)
    for brand, prefixes, lengths in CARDS:
        for _ in range(12):
            prefix, length = rng.choice(prefixes), rng.choice(lengths)
            body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
            number = body + luhn_digit(body)
            if brand == "amex" and rng.random() < 0.5:
                shown = f"{number[:4]} {number[4:10]} {number[10:]}"
            else:
                sep = rng.choice(["", " ", "-"])
                shown = sep.join(number[i:i + 4] for i in range(0, len(number), 4)) if sep else number
            add(f"CARD {brand}", rng.choice(["Card: {} exp 12/27", "卡号 {} 已绑定", "Charged to {}."]), shown, "CARD")
    for _ in range(60):
        area = rng.choice([a for a in range(1, 900) if a != 666])
        ssn = f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        add("SSN hyphenated", rng.choice(["SSN {} on file", "Employee {} onboarded"]), ssn, "SSN")
        add("SSN bare after 'SSN'", "My SSN is {}.", ssn.replace("-", ""), "SSN")
        bad_area = rng.choice(["000", "666", f"9{rng.randint(0, 99):02d}"])
        add("neg SSN never issued", "SSN {} on file", f"{bad_area}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}")
    for _ in range(40):
        doc = rng.choice([f"{rng.choice('EGCKP')}{rng.randint(10 ** 7, 10 ** 8 - 1)}", f"{rng.randint(10 ** 8, 10 ** 9 - 1)}",
                          f"C{rng.randint(0, 99):02d}X{rng.randint(0, 99):02d}T{rng.randint(10, 99)}"])
        add("PASSPORT with context", rng.choice(["Passport number: {}", "护照号码：{}", "His passport no. is {}."]), doc, "PASSPORT")
        lic = rng.choice([f"D{rng.randint(10 ** 6, 10 ** 7 - 1)}", f"{rng.choice('ABSW')}{rng.randint(100, 999)}-{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}"])
        add("DRIVER_LICENSE with context", rng.choice(["Driver's license: {}", "driving licence number {}", "驾驶证 {}"]), lic, "DRIVER_LICENSE")
        add("neg code without context", rng.choice(["Part {} is out of stock.", "Ticket {} was closed.", "Model {} ships in May."]), doc)
    for _ in range(60):
        user = rng.choice(["ann", "li.wei", "j_smith", "ops+alerts", "x9"])
        add("EMAIL", "Write to {} today.", f"{user}@{rng.choice(['example.com', 'mail.co.uk', '163.com', 'uni.edu.cn'])}", "EMAIL")
        add("IP v4", "Login from {} failed.", str(ipaddress.IPv4Address(rng.getrandbits(32))), "IP")
        add("IP v6", "Login from {} failed.", str(ipaddress.IPv6Address(rng.getrandbits(128))), "IP")
        add("CN_ID", "身份证号 {} 已核验", cn_id(rng), "CN_ID")
    for _ in range(150):  # negatives
        y, m, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
        add("neg date", rng.choice(["Meeting on {}.", "截止日期 {}", "Born {}"]),
            rng.choice([f"{y}-{m:02d}-{d:02d}", f"{d:02d}.{m:02d}.{y}", f"{m:02d}/{d:02d}/{y}", f"{y}{m:02d}{d:02d}", f"{y}年{m}月{d}日"]))
        add("neg time", "From {} on.", rng.choice([f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}", f"{y}-{m:02d}-{d:02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"]))
        add("neg version", "Requires version {}.", ".".join(str(rng.randint(0, 20)) for _ in range(rng.randint(2, 4))))
        add("neg amount", "Total {} due.", rng.choice([f"${rng.randint(1, 999999):,}.{rng.randint(0, 99):02d}",
                                                     f"€ {rng.randint(1000, 99999999):,}".replace(",", "."),
                                                     f"¥{rng.randint(100, 9999999)}", f"{rng.randint(1000, 99999999):,} RUB".replace(",", " ")]))
        add("neg ISBN", "ISBN {} (paperback)", isbn13(rng))
        add("neg order/invoice no.", rng.choice(["Order number {} shipped.", "Invoice {} is overdue.", "订单号 {} 已发货"]),
            rng.choice([f"{rng.randint(10 ** 5, 10 ** 12)}", f"INV-{y}-{rng.randint(0, 999999):06d}", f"{y}{m:02d}{d:02d}-{rng.randint(0, 9999):04d}"]))
        add("neg tracking no.", "Tracking {}", "".join(rng.choice("0123456789") for _ in range(rng.randint(12, 22))))
        body = rng.choice("12456789") + "".join(rng.choice("0123456789") for _ in range(12))
        add("neg 14-digit Luhn, no brand", "Reference {} confirmed.", body + luhn_digit(body))
        add("neg coordinates/stats", "{}", rng.choice([f"at {rng.uniform(-90, 90):.4f}, {rng.uniform(-180, 180):.4f}",
                                                       f"p = 0.{rng.randint(1, 999):03d} (n = {rng.randint(10, 99999)})",
                                                       f"population {rng.randint(10 ** 6, 10 ** 9):,}", f"score {rng.randint(0, 9)}-{rng.randint(0, 9)}"]))
    return rows


# --------------------------------------------------------------------------- scoring
def score(rows: list[dict], scrubber: PIIScrubber):
    tp, fp, fn = Counter(), Counter(), Counter()
    group_hits, group_total, misses, alarms = Counter(), Counter(), defaultdict(list), defaultdict(list)
    for r in rows:
        gold = Counter((k, t) for k, t in r["pii"])
        pred = Counter((m.kind, m.text) for m in scrubber.find(r["text"]))
        for (k, t), n in (gold & pred).items():
            tp[k] += n
        for (k, t), n in (pred - gold).items():
            fp[k] += n
            alarms[r["group"]].append(f"{k}: {t!r} in {r['text']!r}")
        for (k, t), n in (gold - pred).items():
            fn[k] += n
            misses[r["group"]].append(f"{t!r} in {r['text']!r}")
        group_total[r["group"]] += 1
        group_hits[r["group"]] += not (pred - gold) if not r["pii"] else not (gold - pred)
    return tp, fp, fn, group_hits, group_total, misses, alarms


def ratio(a, b):
    return f"{a / b:.3f}" if b else "  -  "


def real_corpora(show: int, rounds: int = 3) -> None:
    sources = [("tinyshakespeare", (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8"))]
    tsv = (DATA / "tatoeba-zh-en" / "train.tsv").read_text(encoding="utf-8")
    sources.append(("tatoeba-zh-en sentences", "\n".join("\t".join(l.split("\t")[:2]) for l in tsv.splitlines())))
    sources.append(("tatoeba-zh-en train.tsv (with attribution column)", tsv))
    with gzip.open(DATA / "scifact" / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        sources.append(("scifact abstracts", "\n".join(json.loads(l)["title"] + "\n" + json.loads(l)["text"] for l in f)))
    print(f"\n## Real text (no labels): spans flagged, speed (one thread, best of {rounds}, old and new alternately)")
    regex_old = old_module(REGEX_COMMIT)
    before = old_module(BEFORE_COMMIT)
    for name, text in sources:
        mb = len(text.encode("utf-8")) / 1e6
        scrubber, plain = PIIScrubber(), PIIScrubber(fast=False)
        old = before.PIIScrubber() if before else None
        times = defaultdict(list)
        for _ in range(rounds):  # alternate, so that load from other jobs hits both alike
            if old:
                times["before"].append(_timed(old.find, text))
            times["now"].append(_timed(scrubber.find, text))
        found = scrubber.find(text)
        same = found == plain.find(text)
        speeds = {k: mb / min(v) for k, v in times.items()}
        regex_s = f", regex scrubber {REGEX_COMMIT} {mb / _timed(regex_old.find_pii, text):.1f} MB/s" if regex_old else ""
        before_s = f", before ({BEFORE_COMMIT}) {speeds['before']:.1f} MB/s" if old else ""
        print(f"{name}: {mb:.2f} MB, {len(found)} spans flagged {dict(Counter(m.kind for m in found))}; "
              f"now {speeds['now']:.1f} MB/s{before_s}{regex_s}; fast path == plain path: {same}")
        for m in found[:show]:
            print(f"    {m.kind}: {m.text!r} in {text[max(0, m.start - 40):m.end + 20]!r}")


def _timed(fn, text):
    t0 = time.perf_counter()
    fn(text)
    return time.perf_counter() - t0


REGEX_COMMIT = "aad4812"   # the regex scrubber before issue 21
BEFORE_COMMIT = "ec85a74"  # phonenumbers-based, before the trigger windows and the matcher pre-filter


def old_module(commit: str):
    """zenlm/privacy.py as it was at ``commit``, from git, to time it on the same text."""
    try:
        src = subprocess.run(["git", "show", f"{commit}:zenlm/privacy.py"], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    name = f"privacy_{commit}"
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up there
    exec(compile(src, f"{name}.py", "exec"), module.__dict__)
    return module


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (StopIteration, FileNotFoundError):
        return "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all-regions", action="store_true", help="also score with regions=all 245 (slow)")
    ap.add_argument("--show", type=int, default=6, help="misses / false alarms / real-text flags to print per group")
    ap.add_argument("--no-real", action="store_true", help="skip the real corpora and speed")
    args = ap.parse_args()
    from zenlm.cpu import cpu_info
    print(f"CPU: {cpu_name()} ({cpu_info().describe()}); python {sys.version.split()[0]}; phonenumbers {pn.__version__}; seed {args.seed}")
    rows = labelled_set(args.seed)
    print(f"generated set: {len(rows)} lines, {sum(len(r['pii']) for r in rows)} PII spans, "
          f"{sum(not r['pii'] for r in rows)} lines without PII; default regions {','.join(DEFAULT_REGIONS)}")
    settings = [("default regions", PIIScrubber())]
    if args.all_regions:
        settings.append(("regions = all 245", PIIScrubber(regions=sorted(pn.SUPPORTED_REGIONS))))
    plain = PIIScrubber(fast=False)
    differ = [r["text"] for r in rows if settings[0][1].find(r["text"]) != plain.find(r["text"])]
    print(f"fast path == plain path (fast=False, every finder over the whole line) on all {len(rows)} lines: "
          f"{not differ}{'; differ: ' + repr(differ[:5]) if differ else ''}")
    for label, scrubber in settings:
        tp, fp, fn, hits, total, misses, alarms = score(rows, scrubber)
        print(f"\n## {label}: span-level, exact text and kind\n\n| kind | gold | TP | FP | FN | precision | recall |\n|---|---|---|---|---|---|---|")
        for k in KINDS:
            print(f"| {k} | {tp[k] + fn[k]} | {tp[k]} | {fp[k]} | {fn[k]} | {ratio(tp[k], tp[k] + fp[k])} | {ratio(tp[k], tp[k] + fn[k])} |")
        T, F, N = sum(tp.values()), sum(fp.values()), sum(fn.values())
        print(f"| all | {T + N} | {T} | {F} | {N} | {ratio(T, T + F)} | {ratio(T, T + N)} |")
        print("\n| group | lines | lines right |\n|---|---|---|")
        for g in sorted(total):
            print(f"| {g} | {total[g]} | {hits[g]} ({hits[g] / total[g]:.1%}) |")
        for name, book in (("missed", misses), ("false alarms", alarms)):
            for g in sorted(book):
                print(f"  {name} in {g} ({len(book[g])}): " + "; ".join(book[g][:args.show]))
    old = [json.loads(l) for l in OLD_SET.read_text(encoding="utf-8").splitlines()]
    for r in old:
        r["pii"], r["group"] = [(p["kind"], p["text"]) for p in r["pii"]], "old"
    tp, fp, fn, *_ = score(old, PIIScrubber())
    T, F, N = sum(tp.values()), sum(fp.values()), sum(fn.values())
    print(f"\nhand-written set tests/data/pii_labelled.jsonl ({len(old)} lines): precision {ratio(T, T + F)}, recall {ratio(T, T + N)}")
    if not args.no_real:
        real_corpora(args.show)


if __name__ == "__main__":
    main()
