"""The text corpus: documents per domain from installed sources and user files.

A document is a dict {"text", "source", "license", "title"?}. Built-in domains read
real text that Debian packages install (no network), one module each:

    books.py      books         Jane Austen's six novels   r-cran-janeaustenr (R lazy-load data)
    foldoc.py     encyclopedic  FOLDOC, one entry a doc    dict-foldoc (dictd index + .dz)
    rst.py        docs          Python documentation       python3.11-doc (*.rst.txt, minus faq/)
    stdlib.py     code          the Python standard lib.   the running interpreter
    pdf.py        math          "Derivations of Applied    derivations (PDF)
                                Mathematics"
    faq.py        qa            Debian FAQ + Python FAQ    debian-faq, python3.11-doc (faq/)
    manpages.py   multilingual  German, French man pages   manpages-de, manpages-fr (roff)

and around them:

    text.py       the document record, strict decoding, whitespace clean-up, cutting long
                  text into documents of about DOC_CHARS characters at paragraph ends
    debian.py     where the packages install, the error for a missing one, their versions
    user.py       user sources (text, JSONL, Parquet, local Hugging Face dataset) and the
                  check that DVC tracks their files
    sources.py    the domain table, collect_documents, provenance for reports/corpus.json
    select.py     select_documents (clean, deduplicate, cap, hold out), write_jsonl

Text is decoded strictly: a byte that is not valid in the source's encoding is a
one-line error naming the file and the byte offset, never a silent U+FFFD.
"""
