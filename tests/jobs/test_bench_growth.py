"""``linvision bench --growth``: ratio arithmetic, which mixers are checked, and the exit code (forced by
the limit; no timing is asserted)."""
import json
import sys
import types

from linvision.benchmarks.growth import (
    QUADRATIC_MAX_SIZE, growth_failures, growth_ratios, growth_sizes, print_growth, round_order,
)
from linvision.benchmarks.linfusion_official import official_linfusion_class
from linvision.cli import main
from linvision.mixers import list_mixers, mixer_class


def _rows(name, ms, mib, sizes=(64, 128, 256)):
    return [{"mixer": name, "size": s, "tokens": s * s, "ms": t, "peak_mib": m} for s, t, m in zip(sizes, ms, mib)]


def test_only_softmax_forms_are_not_linear_cost():
    assert {n for n in list_mixers() if not mixer_class(n).linear_cost} == {"softmax", "nala_softmax"}


def test_ratios_and_failures_of_a_fake_run():
    rows = _rows("linear", [10, 40, 200], [1, 4, 16]) + _rows("softmax", [10, 160, 2560], [1, 16, 256])
    ratios = growth_ratios(rows)
    assert [s["time"] for s in ratios["linear"]] == [4.0, 5.0]
    assert [s["memory"] for s in ratios["linear"]] == [4.0, 4.0]
    failures = growth_failures(ratios)
    assert len(failures) == 1 and failures[0].startswith("linear: time grows 5.00x from 16384 to 65536")
    assert growth_failures(ratios, limit=5.0) == []  # softmax's 16x never counts
    assert growth_failures(growth_ratios(_rows("linear", [1, 4], [1, 5], sizes=(63, 126)))) != []  # memory too


def test_limit_scales_with_the_token_ratio():
    ratios = growth_ratios(_rows("linear", [1, 2.2], [0, 0], sizes=(64, 90)))  # 1.98x the tokens
    assert ratios["linear"][0]["memory"] is None
    assert growth_failures(ratios) == []  # 2.2 ≤ 4.5 · 1.98 / 4
    assert growth_failures(ratios, limit=4.4) != []


def test_rounds_alternate_the_order_of_a_mixers_sizes():
    cases = [("linear", 64), ("linear", 128), ("linear", 256), ("lit", 64), ("lit", 128), ("softmax", 64)]
    assert round_order(cases, 0) == [0, 1, 2, 3, 4, 5]
    assert round_order(cases, 1) == [2, 1, 0, 4, 3, 5]
    assert round_order(cases, 2) == round_order(cases, 0)
    assert sorted(round_order(cases, 3)) == list(range(len(cases)))


def test_exit_code_follows_the_limit(tmp_path, capsys):
    common = ["bench", "--growth", "--sizes", "4", "6", "--repeat", "1", "--dim", "16", "--heads", "2"]
    path = tmp_path / "growth.json"
    assert main(common + ["--mixers", "linear", "softmax", "--growth-limit", "0", "--json", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL linear: time grows" in out and "FAIL softmax" not in out
    saved = json.loads(path.read_text())
    assert {r["mixer"] for r in saved["growth"]} == {"linear", "softmax"} and saved["failures"]
    assert main(common + ["--mixers", "linear", "--growth-limit", "1e9", "--clock", "cpu", "--threads", "1"]) == 0
    assert main(common + ["--mixers", "softmax", "--growth-limit", "0"]) == 0
    assert main(common + ["--mixers", "linear", "--threads", "0"]) == 2
    assert main(common + ["--mixers", "linear", "--repeat", "0"]) == 2


def test_official_linfusion_comparison_skips_or_runs(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "linfusion", None)  # not importable, whatever the environment
    assert official_linfusion_class() is None
    assert main(["bench", "--growth", "--mixers", "linfusion", "--sizes", "4", "--repeat", "1", "--dim", "16",
                 "--heads", "2"]) == 0
    assert "LinFusion vs official: skipped" in capsys.readouterr().out
    # A stand-in official package: our own mixer under the official constructor, so the plumbing runs.
    from linvision.mixers import create_mixer

    def official(query_dim, out_dim, dim_head):
        m = create_mixer("linfusion", dim=query_dim, num_heads=query_dim // dim_head)
        forward = m.forward
        m.forward = lambda x: forward(x, (int(x.shape[1] ** 0.5),) * 2)
        return m

    pkg, attention = types.ModuleType("linfusion"), types.ModuleType("linfusion.attention")
    attention.GeneralizedLinearAttention = official
    monkeypatch.setitem(sys.modules, "linfusion", pkg)
    monkeypatch.setitem(sys.modules, "linfusion.attention", attention)
    assert main(["bench", "--growth", "--mixers", "linfusion", "--sizes", "4", "--repeat", "1", "--dim", "16",
                 "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "LinFusion vs official GeneralizedLinearAttention" in out and "0.00e+00" in out


def test_quadratic_mixers_stop_at_the_cap_unless_named(capsys):
    sizes = [64, 128, 256]
    assert QUADRATIC_MAX_SIZE == 128
    assert growth_sizes("softmax", sizes, named=False) == [64, 128]
    assert growth_sizes("nala_softmax", sizes, named=False) == [64, 128]
    assert growth_sizes("softmax", sizes, named=True) == sizes
    assert growth_sizes("linear", sizes, named=False) == sizes  # linear-cost mixers always run every size
    rows = _rows("linear", [10, 40, 170], [1, 4, 16]) + _rows("softmax", [10, 160], [1, 16], sizes=(64, 128))
    print_growth(rows, growth_ratios(rows), 4.5)
    softmax_line = next(line for line in capsys.readouterr().out.splitlines() if line.split()[0] == "softmax")
    assert softmax_line.split()[2:] == ["10.0", "160.0", "-", "16.00x", "-", "16.00x", "-"]
