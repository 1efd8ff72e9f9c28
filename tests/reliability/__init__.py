"""The reliability corpus: bad input, faults and misuse across every verb (see RELIABILITY.md)."""
