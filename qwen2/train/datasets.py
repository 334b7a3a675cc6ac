"""Real training data by name, fetched on first use: the demo sets in llamafactory's sdist
(qwen2.pypi reads them out of the archive; the package's code is never installed or run).

    qwen2 train sft --data alpaca_en_demo ...     # a name here, or a path to your own file

alpaca_en/zh_demo (999/1,000 instruction-output pairs, Alpaca-GPT4 style, non-commercial
upstream), glaive_toolcall_en/zh_demo (300 sharegpt conversations with tool calls, Apache-2.0),
identity (91), v1_sft_demo (500 `messages` with per-turn loss_weight), c4_demo (300 documents of
C4, ODC-BY) and wiki_demo (~1 MB of Wikipedia, CC BY-SA) for pretraining, dpo_en/zh_demo (300
preference pairs each).
"""

from __future__ import annotations

from pathlib import Path

from qwen2.pypi import Part, Payload, payload_path

PACKAGE, VERSION = "llamafactory", "0.9.5"
# name: (file, sha256, bytes)
DEMO = {
    "alpaca_en_demo": ("alpaca_en_demo.json",
                       "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318", 859_893),
    "alpaca_zh_demo": ("alpaca_zh_demo.json",
                       "d5a4be46ae70d23a461ffc16048069324c0865ee9aa0c8730e21ac4b65ea0f08", 636_036),
    "glaive_toolcall_en_demo": ("glaive_toolcall_en_demo.json",
                                "8b84773e44e71881f32490080350734cad3069dc227eafd771ccfb80732f6437", 738_925),
    "glaive_toolcall_zh_demo": ("glaive_toolcall_zh_demo.json",
                                "d5bbc25b250ff7578ea339abe90a612511866d9beb1ea3b66d094b4f250c9c50", 680_684),
    "identity": ("identity.json", "fd029da7dd3df283ed034c82375d16d125a7b07cf1cb0316d03fb8743057d5f2", 20_306),
    "v1_sft_demo": ("v1_sft_demo.jsonl", "a69bf0e0cc728835b3923ea41d328b5a28f317cf20401202cfe550ded4d86642",
                    444_089),
    "c4_demo": ("c4_demo.jsonl", "f51528081ef22279f2840c02c4cd7cdfc372138be0817c5b8714d200af692b78", 747_189),
    "wiki_demo": ("wiki_demo.txt", "69c0c4d067a95a1a65022f2ae1efff9654b1953b09f206f8832620ebbffa0daf", 1_028_326),
    "dpo_en_demo": ("dpo_en_demo.json", "b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3",
                    1_575_286),
    "dpo_zh_demo": ("dpo_zh_demo.json", "9ea7206bc1a45df8b7811d1fc02d5555c65379d05905f343da88f221ff145376",
                    853_311),
}


def data_path(spec: str | Path) -> Path:
    """A path as given, or the cached file of a demo set named in DEMO (fetched on first use)."""
    if str(spec) not in DEMO or Path(spec).exists():
        return Path(spec)
    filename, sha256, size = DEMO[str(spec)]
    part = Part(PACKAGE, VERSION, f"{PACKAGE}-{VERSION}/data/{filename}", "sdist")
    return payload_path(Payload(filename, (part,), sha256, size), f"data/{PACKAGE}-{VERSION}", progress=False)
