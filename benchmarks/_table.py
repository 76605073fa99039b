"""The two-column table every benchmark prints."""

from __future__ import annotations


def print_table(rows: list[tuple[str, str]], footer: str = "") -> None:
    width = max(len(name) for name, _ in rows)
    print(f"{'measurement'.ljust(width)} | result")
    print(f"{'-' * width}-|-{'-' * 60}")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    if footer:
        print(f"\n{footer}")
