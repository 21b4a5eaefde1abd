"""A search's keyword terms are what bm25s finds for the same text (its index's tokenizer)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streams.query.working_set import query_terms, tokenize

QUERIES = [
    "When did Melanie paint a sunrise?",
    "What does Caroline do to de-stress after the 14th of May 2023?",
    "Où est allé Jürgen l'été dernier ?",
    "the a an of",
    "",
    "x y z 42 4x4 ___ runner's running ran",
]


def test_the_terms_of_real_queries_are_bm25s_terms() -> None:
    for q in QUERIES:
        assert query_terms(q) == [t for t in tokenize([q], return_ids=False)[0] if t]


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_the_terms_of_any_text_are_bm25s_terms(text: str) -> None:
    assert query_terms(text) == [t for t in tokenize([text], return_ids=False)[0] if t]
