"""Config validation: one way to say "these must hold" in every config's __post_init__."""

from __future__ import annotations


def require(*checks: tuple[bool, str]) -> None:
    """Raise ValueError with the message of the first (condition, message) that does not hold.

    Messages start with the field they are about ("beta: must be ..."), so the CLI can name
    the flag instead (prefsel.flags.flag_error)."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
