"""multilingual: German and French man pages (Debian packages manpages-de, manpages-fr) as
plain text: a small roff converter, and man-db's rule for a page's encoding."""
from __future__ import annotations

import codecs
import re
import sys
from pathlib import Path

from tqdm import tqdm

from shear.corpus.debian import MAN, broken, require
from shear.corpus.text import decode, doc, gunzip, normalise, split_long
from shear.errors import ShearError

# man-db's rule for a page that declares no encoding: UTF-8 when it is valid UTF-8, else
# the language's legacy 8-bit encoding. Debian's manpages-de/-fr ship UTF-8 only; an
# older or third-party page in Latin-1 is still read right (and named on stderr).
LEGACY_ENCODINGS = {"de": "iso-8859-1", "fr": "iso-8859-1"}
# an Emacs-style declaration in a comment on the first or second line: .\" -*- coding: latin-1 -*-
_CODING = re.compile(rb"""[.']\\"[^\n]*?-\*-.*?coding:\s*([-\w.]+)""")

_ROFF_NAMED = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘",
    "cq": "’", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "bu": "•", "co": "©", "rg": "®", "tm": "™",
    "de": "°", "mu": "×", "di": "÷", "+-": "±", "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←",
    "rs": "\\", "sl": "/", "ba": "|", "or": "|", "at": "@", "sh": "#", "ti": "~", "ha": "^", "ga": "`",
    "dg": "†", "ss": "ß", "pc": "·", "sc": "§", "Eu": "€", "eu": "€", "12": "½", "14": "¼", "34": "¾",
    ":a": "ä", ":o": "ö", ":u": "ü", ":A": "Ä", ":O": "Ö", ":U": "Ü", "'e": "é", "`e": "è", "^e": "ê",
    "'E": "É", "`a": "à", "^a": "â", ",c": "ç", "^o": "ô", "^i": "î", ":e": "ë", ":i": "ï", "^u": "û",
    "`u": "ù", "oe": "œ", "OE": "Œ", "ae": "æ", "AE": "Æ",
}
# one-character escapes that print something; the others (\\& \\, \\/ \\| \\c \\% ...) print nothing
_ROFF_SINGLE = {"-": "-", "e": "\\", "\\": "\\", "0": " ", " ": " ", "~": " ", "t": "\t", "'": "'",
                "`": "`", ".": "."}
_ROFF_ESCAPE = re.compile(r"""\\(?:
      \((?P<two>..)                                   # \(xx   named character
    | \[(?P<name>[^\]]*)\]                            # \[xx]  named character
    | [fFgkmnMVYz*$][+-]?(?:\[[^\]]*\]|\(..|.)        # font, colour, register, string...
    | s[+-]?(?:\d\d?|\[[^\]]*\]|\(..|'[^']*')         # point size
    | [hvwlLoDbxXNZRHSAB]'[^']*'                      # escapes with a quoted argument
    | (?P<one>.)                                      # one-character escapes
)""", re.X)
_ROFF_HEADINGS = {"SH", "SS", "Sh", "Ss"}
_ROFF_BREAKS = {"PP", "LP", "P", "TP", "TQ", "HP", "sp", "Sp", "Pp", "RS", "RE"}
_ROFF_FONT_ALTERNATING = {"BI", "BR", "IB", "IR", "RB", "RI"}
# man/pod2man/groff macros whose arguments are not text
_ROFF_DROP = {"TH", "UR", "UE", "MT", "ME", "IX", "Vb", "Ve", "EX", "EE", "Dd", "Dt", "Os", "Bl", "El",
              "Bd", "Ed", "PD", "SY", "YS", "OP", "TS", "TE"}


def _roff_inline(text: str) -> str:
    def repl(m: re.Match) -> str:
        if m.group("two") is not None:
            return _ROFF_NAMED.get(m.group("two"), "")
        if m.group("name") is not None:
            name = m.group("name")
            if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                return chr(int(name[1:], 16))
            return _ROFF_NAMED.get(name, "")
        if m.group("one") is not None:
            return _ROFF_SINGLE.get(m.group("one"), "")
        return ""

    return _ROFF_ESCAPE.sub(repl, text)


def _roff_args(rest: str) -> list[str]:
    """Macro arguments: blank-separated words, "double quoted" groups ("" is a quote)."""
    return [q.replace('""', '"') if q or w == "" else w
            for q, w in re.findall(r'"((?:[^"]|"")*)"?|(\S+)', rest)]


def roff_to_text(source: str) -> str:
    """Plain text of a man page (roff): comments, macro and request names, conditionals,
    macro definitions and table layouts are dropped; the text and the text arguments of
    macros (headings, font macros, list tags) are kept; paragraph macros become blank lines."""
    out: list[str] = []
    in_definition = in_table_layout = False
    for line in source.split("\n"):
        if in_definition:  # .de/.am/.ig blocks run to a line starting with ".."
            in_definition = not line.startswith("..")
            continue
        if not line.startswith((".", "'")):  # a text line
            if in_table_layout:  # tbl: options and layout lines, the last one ends with "."
                in_table_layout = not line.rstrip().endswith(".")
            elif not re.fullmatch(r"\s*[_=]\s*", line):  # not a table rule
                text = re.sub(r'(?<!\\)\\["#].*', "", line).replace("T{", "").replace("T}", "")
                out.append(_roff_inline(text))
            continue
        name, rest = re.match(r"[.'][ \t]*(\S*)[ \t]*(.*)", line).groups()
        if not name or name.startswith(("\\\"", "\\#")):
            continue  # a comment or an empty request
        if name in ("de", "de1", "am", "am1", "ig"):
            in_definition = True
            continue
        in_table_layout = name == "TS"
        args = [_roff_inline(a) for a in _roff_args(re.sub(r'(?<!\\)\\".*', "", rest))]
        if name in _ROFF_HEADINGS:
            out += ["", " ".join(args), ""]
        elif name in _ROFF_BREAKS:
            out.append("")
        elif name == "IP":
            out += ["", args[0]] if args and args[0] else [""]
        elif name in _ROFF_FONT_ALTERNATING:
            out.append("".join(args))
        elif args and not name[0].islower() and name not in _ROFF_DROP:
            out.append(" ".join(args))  # B, I, SM, mdoc's Nm/Nd/Fl ...: keep the words
        # everything else: roff requests (lower case) and macros whose arguments are not text
    return "\n".join(out)


def decode_man_page(data: bytes, path: str | Path, lang: str) -> str:
    """The text of a man page: in its declared encoding if it has one, else UTF-8, else
    (man-db's fallback) the legacy encoding of `lang`, with a notice naming the page."""
    fix = broken("multilingual", f"manpages-{lang}")
    for line in data.split(b"\n", 2)[:2]:
        declared = _CODING.match(line)
        if declared:
            encoding = declared.group(1).decode("ascii")
            try:
                codecs.lookup(encoding)
            except LookupError:
                raise ShearError(f"{path}: declares an unknown encoding {encoding!r}; {fix}") from None
            return decode(data, path, encoding, fix)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if lang not in LEGACY_ENCODINGS:
            return decode(data, path, "utf-8", fix)  # the one-line error
    print(f"corpus: {path} is not UTF-8 and declares no encoding; read as {LEGACY_ENCODINGS[lang]} "
          f"(man-db's rule for {lang!r} pages)", file=sys.stderr)
    return data.decode(LEGACY_ENCODINGS[lang])


def read_man_pages(root: str | Path = MAN, languages: tuple[str, ...] = ("de", "fr")) -> list[dict]:
    """Translated man pages (manpages-<lang>) as plain text, one page (cut when long) each.
    Symbolic links (aliases of another page) and the translators' section are skipped."""
    docs = []
    for lang in languages:
        lang_root = require(Path(root) / lang, "multilingual", f"manpages-{lang}")
        files = [p for p in sorted(lang_root.glob("man*/*.gz")) if not p.is_symlink()]
        for path in tqdm(files, desc=f"corpus multilingual ({lang})", unit="page"):
            name = path.name[:-3]  # ls.1
            page, _, section = name.rpartition(".")
            data = gunzip(path, broken("multilingual", f"manpages-{lang}"))
            text = roff_to_text(decode_man_page(data, path, lang))
            # the translators' section (credits and a licence notice) is the same on every page
            text = re.split(r"\n(?:ÜBERSETZUNG|TRADUCTION)\n", text)[0]
            for k, chunk in enumerate(split_long(normalise(text))):
                docs.append(doc(chunk, f"manpages-{lang}", "GPL-3.0-or-later", f"{page}({section}) [{lang}] ({k + 1})"))
    return docs
