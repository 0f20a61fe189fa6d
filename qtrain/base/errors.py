"""Error types shared by every layer (each message is one sentence naming problem and fix).

A message names the settings its fix changes through placeholders, so that it speaks the
language of whoever reads it: ``UserError("lower {batch_size}", batch_size="batch_size")``
reads "lower batch_size" from the library and "lower --batch-size" from the command line.
`str()` gives the library's spelling (each keyword's value: a name, or name=value); a front
end passes its own spelling to `render`. Library messages therefore never name a flag.
"""

from __future__ import annotations

from collections.abc import Callable


class NamesSettings(Exception):
    """Mixin for an error whose message names settings through {placeholders} (above)."""

    def __init__(self, message: str, **settings: str) -> None:
        self.template, self.settings = message, settings
        super().__init__(self.render())

    def render(self, spell: Callable[[str, str], str] | None = None) -> str:
        """The message, each setting spelled by `spell(name, library spelling)`."""
        if not self.settings:
            return self.template
        spell = spell or (lambda _name, spelling: spelling)
        text = self.template
        for name, spelling in self.settings.items():  # no str.format: other braces stay as is
            text = text.replace("{" + name + "}", spell(name, spelling))
        return text

    def __reduce__(self):
        # pickled with its template and settings, so that it crosses a process boundary (a
        # worker training an experiment's cell) and still renders in the reader's spelling
        return (_rebuild, (type(self), self.template, self.settings))


def _rebuild(cls: type, template: str, settings: dict) -> NamesSettings:
    return cls(template, **settings)


class UserError(NamesSettings, ValueError):
    """A value, name or file that the user gave and can fix."""


class MissingDependencyError(ImportError):
    """An optional dependency (an extra of the qtrain package) is not installed."""


# Errors an input can cause (a value, a name, a path, a file): the command line prints them as
# one line and exits with 2. Every other exception is a bug in qtrain.
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (
    UserError,
    NamesSettings,
    MissingDependencyError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
)
