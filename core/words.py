"""Words for people: a number with its noun in the right form ("1 class image", "2 class images")."""
from __future__ import annotations


def count(n: int, noun: str) -> str:
    """`1 class image`, `2 class images` (nouns that take an -s)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
