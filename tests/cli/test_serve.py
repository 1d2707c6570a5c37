"""`zenlm billing report` (cli/serve.py)."""
import pytest

from zenlm.cli import main


def test_billing_report_defaults_to_this_month(tmp_path, capsys):
    pytest.importorskip("sqlalchemy", reason="the serve extra is not installed")
    import time

    assert main(["billing", "report", "--database", str(tmp_path / "z.sqlite3"), "--by", "customer"]) == 0
    assert f"{time.strftime('%Y-%m', time.gmtime())} by customer" in capsys.readouterr().out
    assert main(["billing", "report", "--database", str(tmp_path / "z.sqlite3"), "--month", "2026-13"]) == 2
    assert "month must be YYYY-MM" in capsys.readouterr().err


def test_plans_keys_and_report_print_the_billing_formatters(tmp_path, capsys):
    pytest.importorskip("sqlalchemy", reason="the serve extra is not installed")
    from zenlm.serve.billing import Billing, format_keys, format_plan, format_report

    db = str(tmp_path / "z.sqlite3")
    assert main(["plans", "create", "basic", "--price", "*=0.50:1.50", "--budget", "20", "--database", db]) == 0
    assert main(["keys", "create", "--customer", "acme", "--plan", "basic", "--database", db]) == 0
    capsys.readouterr()
    billing = Billing.open(db)
    assert main(["plans", "list", "--database", db]) == 0
    assert capsys.readouterr().out == format_plan(billing.get_plan("basic")) + "\n"
    assert main(["keys", "list", "--database", db]) == 0
    keys = format_keys(billing.list_keys())
    assert capsys.readouterr().out == keys + "\n" and keys.split()[:3] == ["prefix", "customer", "plan"]
    assert main(["billing", "report", "--month", "2026-01", "--by", "model", "--database", db]) == 0
    report = format_report(billing.report("2026-01", "model"))
    assert capsys.readouterr().out == "\n" + report + "\n"
    assert report.splitlines()[0] == "2026-01 by model" and report.splitlines()[-1].startswith("total ")
