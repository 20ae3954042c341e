"""Readers for JSON-shaped calls: ``{"name": "f", "arguments": {...}}`` and bare ``{...}``.

A reader consumes one JSON object from the stream's text and settles on a
`Result`. A call object is *committed* (announced, then streamed) at the first
character of its arguments object when its name came before: from there the
arguments grow fragment by fragment. Any other order, or arguments given as a
JSON string, is decided once the object is complete.
"""

from __future__ import annotations

import enum
import json

from dynamo_gateway.parsers._json import JsonScanner, Member, compact

NAME_KEY = "name"


class Result(enum.Enum):
    CALL = "call"  # a complete call
    REJECT = "reject"  # not a call: the text read is content
    BROKEN = "broken"  # a committed call broke off; its arguments were closed


class _ArgsSource:
    """Emits a JSON object's text up to the scanner's safe point, closing it if cut short."""

    def __init__(self, scanner: JsonScanner) -> None:
        self._scanner = scanner
        self._emitted: int | None = None  # position emitted up to; None until committed
        self._tail = ""  # closing text still to emit after a break

    def commit(self, start: int) -> None:
        self._emitted = start

    @property
    def committed(self) -> bool:
        return self._emitted is not None

    def take(self, end: int | None) -> str:
        """New argument text; ``end`` is where the object ended, if it has."""
        if self._emitted is None:
            return ""
        bound = end if end is not None else self._scanner.safe
        out = ""
        if bound > self._emitted:
            out = self._scanner.text(self._emitted, bound)
            self._emitted = bound
        out, self._tail = out + self._tail, ""
        return out

    def close(self, drop: int) -> None:
        """The object will not end: close it after what is safe (``drop`` outer closers)."""
        closer = self._scanner.closer
        self._tail = closer[: len(closer) - drop] if drop else closer


class CallReader:
    """Reads ``{"name": ..., <args key>: {...}}``.

    :param arg_keys: keys that hold the arguments (``arguments``, ``parameters``).
    :param require_args: a call must have arguments (else ``{}`` stands in).
    :param allowed_keys: if given, any other top-level key means "not a call"
        as soon as it is read, so that plain JSON answers are not held back.
    """

    def __init__(
        self,
        arg_keys: tuple[str, ...] = ("arguments",),
        *,
        require_args: bool = False,
        allowed_keys: frozenset[str] | None = None,
    ) -> None:
        self._scanner = JsonScanner(members=True)
        self._source = _ArgsSource(self._scanner)
        self._arg_keys = arg_keys
        self._require_args = require_args
        self._allowed = allowed_keys
        self._args: Member | None = None
        self._final_args: str | None = None
        self.name: str | None = None
        self.result: Result | None = None

    @property
    def announced(self) -> bool:
        """The call's name can be sent (committed, or complete)."""
        return self._source.committed or self.result is Result.CALL

    def feed(self, text: str, i: int) -> int:
        """Consume ``text`` from ``i`` until a result; return the next index."""
        while i < len(text) and self.result is None:
            i = self._scanner.feed(text, i)
            self._check()
        return i

    def finish(self) -> None:
        """The text ended."""
        if self.result is not None:
            return
        self._scanner.finish()
        self._check()
        if self.result is None:
            self._break()

    def take(self) -> str:
        """Argument text not yet handed out."""
        if self._final_args is not None:
            out, self._final_args = self._final_args, ""
            return out
        return self._source.take(self._args.end if self._args is not None else None)

    def _break(self) -> None:
        if self._source.committed:
            if self._args is not None and self._args.end is None:
                self._source.close(drop=1)  # the outer object's "}"
            self.result = Result.BROKEN
        else:
            self.result = Result.REJECT

    def _check(self) -> None:
        scanner = self._scanner
        if scanner.error:
            self._break()
            return
        if scanner.members:
            member = scanner.members[-1]
            committed = self._source.committed
            if self._allowed is not None and member.key not in self._allowed and not committed:
                self.result = Result.REJECT
                return
            if member.key == NAME_KEY and member.end is not None and self.name is None:
                name = json.loads(scanner.text(member.start, member.end))
                if isinstance(name, str) and name:
                    self.name = name
                elif self._allowed is not None:
                    self.result = Result.REJECT
                    return
            if member.key in self._arg_keys and self._args is None:
                self._args = member
            if (
                self._args is member
                and member.end is None
                and self.name is not None
                and not self._source.committed
                and scanner.text(member.start, member.start + 1) == "{"
            ):
                self._source.commit(member.start)
        if scanner.done:
            if self._source.committed:
                self.result = Result.CALL
            else:
                self._decide()

    def _decide(self) -> None:
        """A complete object that was not streamed: is it a call?"""
        self.result = Result.REJECT
        if self.name is None:
            return
        if self._args is None:
            if self._require_args:
                return
            self._final_args = "{}"
        else:
            assert self._args.end is not None
            text = self._scanner.text(self._args.start, self._args.end)
            value = json.loads(text)
            if isinstance(value, str):  # arguments sent as a JSON-encoded string
                try:
                    value = json.loads(value)
                except ValueError:
                    return
                if not isinstance(value, dict):
                    return
                text = compact(value)
            elif not isinstance(value, dict):
                return
            self._final_args = text
        self.result = Result.CALL


class ArgsReader:
    """Reads a bare arguments object ``{...}``, committed from its first character."""

    def __init__(self) -> None:
        self._scanner = JsonScanner()
        self._source = _ArgsSource(self._scanner)
        self._source.commit(0)
        self.result: Result | None = None

    def feed(self, text: str, i: int) -> int:
        i = self._scanner.feed(text, i)
        if self._scanner.error:
            self._source.close(drop=0)
            self.result = Result.BROKEN
        elif self._scanner.done:
            self.result = Result.CALL
        return i

    def finish(self) -> None:
        if self.result is None:
            self._scanner.finish()
            if self._scanner.done:
                self.result = Result.CALL
            else:
                self._source.close(drop=0)
                self.result = Result.BROKEN

    def take(self) -> str:
        return self._source.take(self._scanner.size if self._scanner.done else None)
