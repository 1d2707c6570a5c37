"""`zenlm plans|keys|billing`: thin commands over billing; bad input is one line and exit code 2."""
from __future__ import annotations

import csv
import time

import pytest

from zenlm.cli import main
from zenlm.serve.billing import Billing, Usage


def test_plans_keys_and_billing_report(tmp_path, capsys):
    db = str(tmp_path / "cli.sqlite3")
    assert main(["plans", "create", "basic", "--price", "*=0.50:1.50", "--price", "tiny=1:2", "--budget", "20",
                 "--included-tokens", "0", "--rpm", "30", "--tpm", "5000", "--database", db]) == 0
    assert "tiny=1.000000:2.000000" in capsys.readouterr().out
    assert main(["keys", "create", "--customer", "acme", "--plan", "basic", "--database", db]) == 0
    key = capsys.readouterr().out.strip()
    billing = Billing.open(db)
    ctx = billing.authenticate(key)
    assert ctx.plan.prices == {"*": (500_000, 1_500_000), "tiny": (1_000_000, 2_000_000)}
    assert ctx.plan.monthly_budget_micros == 20_000_000 and ctx.plan.requests_per_minute == 30
    for i, (model, p, c, ms) in enumerate([("tiny", 1000, 500, 40), ("other", 2000, 0, 10)]):
        billing.settle(billing.reserve(ctx, f"r{i}", model, p, c), Usage(p, c, 0, ms), f"r{i}", "/v1/completions")
    month = time.strftime("%Y-%m", time.gmtime())
    assert main(["billing", "report", "--month", month, "--csv", str(tmp_path / "r.csv"),
                 "--plot", str(tmp_path / "r.png"), "--database", db]) == 0
    out = capsys.readouterr().out
    assert "by customer" in out and "by model" in out and "by day" in out
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    totals = [r for r in rows if r["group"] == "total"]
    # tiny: 1000 * 1.00/1M + 500 * 2.00/1M = 0.002; other: 2000 * 0.50/1M = 0.001
    assert len(totals) == 3 and all(t["revenue"] == "0.003000" and t["requests"] == "2" for t in totals)
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert main(["keys", "list", "--database", db]) == 0
    listing = capsys.readouterr().out
    assert key[:11] in listing and key not in listing
    assert main(["keys", "revoke", key[:11], "--database", db]) == 0
    capsys.readouterr()
    assert billing.list_keys()[0]["revoked_at"] is not None


@pytest.mark.parametrize("argv,message", [
    (["plans", "create", "x", "--price", "bad"], "--price must look like MODEL=PROMPT:COMPLETION"),
    (["plans", "create", "x", "--price", "*=1.5:abc"], "is not an amount of money"),
    (["keys", "create", "--customer", "c", "--plan", "nope"], "no plan named 'nope'"),
    (["keys", "revoke", "zk-missing"], "no key with prefix"),
    (["billing", "report", "--month", "2026-13"], "month must be YYYY-MM"),
    (["serve", "/no/such/model"], "no model folder at /no/such/model"),
    (["serve"], "nothing to serve"),
    (["keys", "list", "--database", "mysql://x/y"], "is not supported"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, argv, message, capsys):
    if "--database" not in argv:
        argv = argv + ["--database", str(tmp_path / "db.sqlite3")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
