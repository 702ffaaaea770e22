"""User-facing errors: what is wrong, and what to do next.

Anything raised as a KdError is printed by the CLI as ``error: MESSAGE`` and
``hint: HINT`` and exits 1 without a traceback. Every other exception is a bug
in kd and keeps its traceback.
"""

from __future__ import annotations


class KdError(Exception):
    """An error the user can fix: bad recipe, bad data, missing model, mismatched cache."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class RecipeError(KdError):
    """The recipe (or a --set override) is invalid. ``problems`` lists every error by key path."""

    def __init__(self, problems: list[str], source: str = "recipe", hint: str = "") -> None:
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        body = "\n".join(f"  {p}" for p in problems)
        # Problems that each name their override ("--set KEY=VALUE: ...") need no source before them.
        named = source == "--set" and all(p.startswith("--set ") for p in problems)
        super().__init__(
            (count + "\n" + body if len(problems) > 1 else problems[0]) if named
            else f"{source}: {count}\n{body}" if len(problems) > 1 else f"{source}: {problems[0]}",
            hint or "fix the keys above; `kd check RECIPE` validates without running anything",
        )


class DataError(KdError):
    """The dataset cannot be read or normalised."""


class ModelError(KdError):
    """A model cannot be loaded or does not fit the task."""


class CacheError(KdError):
    """A teacher cache is missing, incomplete or does not match the recipe."""



class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with where the work stopped and how to go on. A KeyboardInterrupt, not a
    KdError: whatever stops on an interrupt (`kd tune`'s study) still stops."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
