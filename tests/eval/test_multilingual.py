"""The multilingual eval: the UDHR in Qwen2's 29 languages, fertility, and the probe's scoring."""

import json

import pytest

from qwen2.cli import main
from qwen2.eval import multilingual


def test_the_declaration_is_there_in_all_29_languages():
    for code in multilingual.LANGUAGES:
        blocks = multilingual.declaration(code)
        assert len(blocks) > 50 and sum(len(t) for _, t in blocks) > 2000, code
    assert multilingual.text("fra", 60).startswith("Déclaration universelle des droits de l")


def test_fertility_counts_tokens_per_character_and_word(default_tokenizer):
    row = multilingual.fertility_row(default_tokenizer, "eng", 1000)
    assert row["chars"] == 1000 and row["tokens"] == len(default_tokenizer.encode(multilingual.text("eng", 1000)))
    assert row["tokens_per_char"] == pytest.approx(row["tokens"] / 1000, abs=1e-4)
    # an English-heavy vocabulary spends far more tokens per character on Khmer
    assert multilingual.fertility_row(default_tokenizer, "khm", 1000)["tokens_per_char"] > 3 * row["tokens_per_char"]


def test_the_language_identifier_knows_the_probe_languages():
    assert multilingual.identify("Toute personne a droit à la liberté d'opinion et d'expression.") == "fr"
    assert multilingual.identify("Everyone has the right to freedom of opinion and expression.") == "en"
    for code, (_, iso) in multilingual.LANGUAGES.items():
        if iso is not None and code not in ("mly_latn", "ind"):  # Malay and Indonesian are near twins
            assert multilingual.identify(multilingual.probe_passages(code, 1)[0]) == iso, code


def test_probe_rates_split_by_asked_language():
    records = [dict(language="fra", asked="en", in_asked=True), dict(language="fra", asked="en", in_asked=False),
               dict(language="fra", asked="fr", in_asked=True), dict(language="eng", asked="en", in_asked=True)]
    rates = multilingual.probe_rates(records)
    # Wilson by hand: 1 of 2 is 9.45% to 90.55%, 1 of 1 is 20.65% to 100%
    assert rates["fra"] == {"english": {"answers": 2, "in_asked": 1, "percent": 50.0, "ci95": [9.45, 90.55]},
                            "own": {"answers": 1, "in_asked": 1, "percent": 100.0, "ci95": [20.65, 100.0]}}
    assert list(rates["eng"]) == ["english"]


def test_an_unknown_language_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "multilingual", "--langs", "eng,klingon", "--no-ppl", "--no-probe"])
    err = capsys.readouterr().err
    assert "unknown language code 'klingon'" in err and "cmn_hans" in err


def test_the_chart_is_a_png_with_or_without_perplexity(tmp_path):
    pytest.importorskip("matplotlib", reason="the chart needs the optional matplotlib")
    rows = [dict(language="eng", tokens_per_char=0.18, ppl=5.0), dict(language="khm", tokens_per_char=1.2, ppl=20.0)]
    multilingual.save_chart(rows, tmp_path / "both.png", "both")
    multilingual.save_chart([dict(language=r["language"], tokens_per_char=r["tokens_per_char"]) for r in rows],
                            tmp_path / "fertility.png", "fertility only")
    for name in ("both.png", "fertility.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_probe_table_shows_each_rate_with_its_interval(tiny_hf, tmp_path, capsys):
    main(["eval", "multilingual", "--model", str(tiny_hf), "--langs", "fra", "--limit", "1", "--no-ppl",
          "--max-tokens", "4", "--ctx", "512", "--json", str(tmp_path / "m.json")])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| fra |"))
    summary = json.loads((tmp_path / "m.json").read_text())["summary"]["fra"]
    for mode in ("english", "own"):
        rate = summary[f"probe_{mode}"]
        assert rate["answers"] == 1 and rate["ci95"] == ([20.65, 100.0] if rate["in_asked"] else [0.0, 79.35])
        assert f"{rate['percent']:g} ({rate['ci95'][0]:g} to {rate['ci95'][1]:g})" in row
