"""Level 1's pieces: terms in many scripts, BM25 finding a planted passage, the keyword JSON and its fallback."""

from qwen2.agent.documents import Document, Source
from qwen2.agent.retrieval import Index, parse_keywords, terms


def test_terms_split_spaced_scripts_into_words_and_unspaced_ones_into_character_pairs():
    assert terms("The Quick brown fox's den") == ["quick", "brown", "fox's", "den"]
    assert terms("北京大学") == ["北京", "京大", "大学"]
    assert terms("ภาษาไทย") == ["ภา", "าษ", "ษา", "าไ", "ไท", "ทย"]
    assert terms("Привет мир مرحبا 안녕하세요") == ["привет", "мир", "مرحبا", "안녕하세요"]
    assert terms("東京タワー") == ["東京", "京タ", "タワ", "ワー"]


def test_bm25_finds_a_planted_passage_in_real_prose(default_tokenizer):
    from qwen2.eval.data import haystack_text

    text = haystack_text()[:200_000]
    cut = text.find(". ", len(text) // 3) + 1
    needle = " The lighthouse keeper Okafor hid the spare key inside a tin kettle."
    doc = Document([Source("wiki.txt", text[:cut] + needle + text[cut:])], default_tokenizer)
    chunks = doc.chunks(500, 32)
    assert len(chunks) > 80
    found = Index(chunks).search(terms("Where did Okafor hide the spare key?"), budget=500)
    assert len(found) == 1 and "tin kettle" in found[0].text


def test_bm25_finds_a_chinese_passage_with_chinese_keywords(default_tokenizer):
    paragraphs = ["今天天气很好，我们去公园散步。", "图书馆的钥匙藏在红色的花盆里。", "他喜欢喝绿茶和看电影。"] * 1
    doc = Document([Source("zh.txt", "\n\n".join(paragraphs))], default_tokenizer)
    found = Index(doc.chunks(16)).search(terms("钥匙 花盆"), budget=16)
    assert [c.text.strip() for c in found] == ["图书馆的钥匙藏在红色的花盆里。"]


def test_keyword_json_is_read_also_inside_a_fence():
    reply = 'Sure:\n```json\n{"information": ["vault passphrase"], "instruction": ["answer briefly"], ' \
            '"keywords_en": ["passphrase", "vault"], "keywords_zh": ["密码"]}\n```'
    k = parse_keywords(reply, "What is the vault passphrase?")
    assert k.parsed and k.keywords_en == ["passphrase", "vault"] and k.keywords_zh == ["密码"]
    assert k.instruction == ["answer briefly"]
    assert set(k.query()) >= {"passphrase", "vault", "密码"}


def test_broken_keyword_json_falls_back_to_the_question():
    for reply in ['{"keywords_en": ["passphrase", ', "I cannot help", '{"keywords_en": 7}', "[1, 2]"]:
        k = parse_keywords(reply, "What is the vault passphrase?")
        assert not k.parsed
        assert k.query() == ["vault", "passphrase"]
