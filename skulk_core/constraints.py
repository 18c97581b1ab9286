"""Constrained sampling: which tokens keep a request's output inside a format (JSON mode).

:class:`JsonPrefix` is an incremental, character-level pushdown automaton that answers "is the
text so far the start of exactly one JSON object?" (RFC 8259 grammar, top-level object, leading
whitespace allowed). It never accepts a dead end: every prefix it accepts can still be completed,
so a sampler that picks only accepted tokens can always go on, as long as the vocabulary holds
JSON's single characters (every byte-level BPE vocabulary does).

:class:`JsonObjectConstraint` lifts that to tokens for one request: a token is allowed when its
bytes, after whatever part of a UTF-8 character earlier tokens left pending, keep the text a valid
prefix. Control tokens are never allowed, end-of-generation only once the object is complete. The
sampler asks :meth:`~JsonObjectConstraint.allows` for its candidates in the order it would pick
them (lazy masking), so the usual step, where the model's favourite is valid, costs one check.
:class:`TokenTexts` caches each token's decoded text per tokenizer, shared by a runner's requests.
"""

from __future__ import annotations

import codecs
import re
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from skulk_core.backend import Tokenizer

# Whitespace outside strings, in a row: enough for pretty-printed JSON nested seven deep at four
# spaces, and a bound on a model that would otherwise emit newlines until max_tokens (llama.cpp's
# JSON grammar bounds it too).
MAX_WHITESPACE = 32

# Modes of the automaton: what the next character may be.
START = 0  # before the top-level object: whitespace or "{"
OBJECT_FIRST = 1  # after "{": a key or "}"
KEY = 2  # after "," in an object: a key
COLON = 3  # after a key
VALUE = 4  # after ":", or after "," in an array
ARRAY_FIRST = 5  # after "[": a value or "]"
AFTER = 6  # after a value inside a container: "," or the closing bracket
STRING = 7
ESCAPE = 8  # after a backslash in a string
UNICODE = 9  # in a \uXXXX escape; ``aux`` hex digits to go
LITERAL = 10  # in true, false or null; ``aux`` is the rest of the word
MINUS = 11  # numbers: after "-"
ZERO = 12  # a leading 0 (no more integer digits)
INTEGER = 13
DOT = 14  # after "." (a digit must follow)
FRACTION = 15
EXPONENT = 16  # after "e" or "E"
EXPONENT_SIGN = 17
EXPONENT_DIGITS = 18
DONE = 19  # the top-level object is closed: only whitespace may follow

_NUMBER_ENDS = frozenset({ZERO, INTEGER, FRACTION, EXPONENT_DIGITS})  # a number may stop here
_WHITESPACE = frozenset(" \t\n\r")
_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")
_ESCAPES = frozenset('"\\/bfnrt')
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
_PLAIN = re.compile(r'[^"\\\x00-\x1f]+')  # string characters that need no attention

# (mode, open containers as a string of "{" and "[", the string being read is a key, aux, whitespace run)
State = tuple[int, str, bool, "int | str", int]
INITIAL: State = (START, "", False, 0, 0)


def advance(state: State, text: str) -> State | None:
    """The state after ``text``, or None if ``text`` cannot continue the JSON object."""
    mode, stack, key, aux, spaces = state
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if mode == STRING:
            plain = _PLAIN.match(text, i)
            if plain is not None:
                i = plain.end()
                continue
            if c == '"':
                mode, key = (COLON if key else AFTER), False
            elif c == "\\":
                mode = ESCAPE
            else:
                return None  # a raw control character
            i += 1
            continue
        if mode == ESCAPE:
            if c == "u":
                mode, aux = UNICODE, 4
            elif c in _ESCAPES:
                mode = STRING
            else:
                return None
            i += 1
            continue
        if mode == UNICODE:
            if c not in _HEX:
                return None
            aux = int(aux) - 1
            if not aux:
                mode = STRING
            i += 1
            continue
        if mode == LITERAL:
            rest = str(aux)
            if c != rest[0]:
                return None
            aux = rest[1:]
            if not aux:
                mode = AFTER
            i += 1
            continue
        if mode >= MINUS and mode <= EXPONENT_DIGITS:
            if c in _DIGITS:
                if mode == MINUS:
                    mode = ZERO if c == "0" else INTEGER
                elif mode == ZERO:
                    return None  # no leading zeros
                elif mode == DOT:
                    mode = FRACTION
                elif mode == EXPONENT or mode == EXPONENT_SIGN:
                    mode = EXPONENT_DIGITS
                i += 1
                continue
            if c == "." and (mode == ZERO or mode == INTEGER):
                mode = DOT
            elif c in "eE" and (mode == ZERO or mode == INTEGER or mode == FRACTION):
                mode = EXPONENT
            elif c in "+-" and mode == EXPONENT:
                mode = EXPONENT_SIGN
            elif mode in _NUMBER_ENDS:
                mode = AFTER  # the number ended; read ``c`` again as what follows a value
                continue
            else:
                return None
            i += 1
            continue
        # Between tokens of the grammar.
        if c in _WHITESPACE:
            spaces += 1
            if spaces > MAX_WHITESPACE:
                return None
            i += 1
            continue
        spaces = 0
        if mode == AFTER:
            top = stack[-1]
            if c == ",":
                mode = KEY if top == "{" else VALUE
            elif (c == "}" and top == "{") or (c == "]" and top == "["):
                stack = stack[:-1]
                mode = AFTER if stack else DONE
            else:
                return None
        elif mode == VALUE or mode == ARRAY_FIRST:
            if c == "{":
                stack, mode = stack + "{", OBJECT_FIRST
            elif c == "[":
                stack, mode = stack + "[", ARRAY_FIRST
            elif c == '"':
                mode = STRING
            elif c == "-":
                mode = MINUS
            elif c == "0":
                mode = ZERO
            elif c in _DIGITS:
                mode = INTEGER
            elif c in _LITERALS:
                mode, aux = LITERAL, _LITERALS[c]
            elif c == "]" and mode == ARRAY_FIRST:
                stack = stack[:-1]
                mode = AFTER if stack else DONE
            else:
                return None
        elif mode == OBJECT_FIRST or mode == KEY:
            if c == '"':
                mode, key = STRING, True
            elif c == "}" and mode == OBJECT_FIRST:
                stack = stack[:-1]
                mode = AFTER if stack else DONE
            else:
                return None
        elif mode == COLON:
            if c != ":":
                return None
            mode = VALUE
        elif mode == START:
            if c != "{":
                return None
            stack, mode = "{", OBJECT_FIRST
        else:  # DONE: nothing but whitespace after the object
            return None
        i += 1
    return (mode, stack, key, aux, spaces)


class JsonPrefix:
    """Text fed so far, checked as the start of one JSON object (see :func:`advance`)."""

    def __init__(self, state: State = INITIAL) -> None:
        self.state = state

    @property
    def complete(self) -> bool:
        """The top-level object is closed."""
        return self.state[0] == DONE

    def accepts(self, text: str) -> bool:
        """Whether ``text`` would continue the JSON, without feeding it."""
        return advance(self.state, text) is not None

    def feed(self, text: str) -> bool:
        """Feed ``text`` if it continues the JSON and return True; otherwise change nothing."""
        after = advance(self.state, text)
        if after is None:
            return False
        self.state = after
        return True

    def copy(self) -> JsonPrefix:
        return JsonPrefix(self.state)


class TokenConstraint(Protocol):
    """What :class:`skulk_core.sampling.Sampler` asks of a constraint, one request's."""

    @property
    def complete(self) -> bool:
        """The output is finished: the request ends with finish_reason "stop"."""

    def allows(self, token_id: int) -> bool:
        """Whether ``token_id`` may come next."""

    def advance(self, token_id: int) -> None:
        """``token_id`` was sampled (it was allowed)."""


class TokenTexts:
    """Each token's bytes and text as constraints see them, read from the tokenizer once.

    An entry is None for control and end-of-generation tokens, else ``(raw bytes, text, rest)``:
    the text the bytes decode to and the bytes of an incomplete UTF-8 character at their end
    (``text`` is None when the bytes are not valid UTF-8 on their own).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._eos = frozenset(tokenizer.eos_token_ids)
        self._entries: dict[int, tuple[bytes, str | None, bytes] | None] = {}

    def get(self, token_id: int) -> tuple[bytes, str | None, bytes] | None:
        try:
            return self._entries[token_id]
        except KeyError:
            pass
        tokenizer = self._tokenizer
        entry: tuple[bytes, str | None, bytes] | None = None
        if token_id not in self._eos and not tokenizer.is_control(token_id):
            raw = tokenizer.token_bytes(token_id)
            try:
                text, used = codecs.utf_8_decode(raw, "strict", False)
                entry = (raw, text, raw[used:])
            except UnicodeDecodeError:
                entry = (raw, None, b"")
        self._entries[token_id] = entry
        return entry


class JsonObjectConstraint:
    """One request's JSON mode: tokens allowed only while the output stays a prefix of one JSON
    object; complete when the object closes."""

    def __init__(self, texts: TokenTexts) -> None:
        self._texts = texts
        self._state = INITIAL
        self._pending = b""  # the start of a UTF-8 character the last token left incomplete
        self._checked: tuple[int, tuple[State, bytes] | None] | None = None  # the last answer

    @property
    def complete(self) -> bool:
        return self._state[0] == DONE

    def allows(self, token_id: int) -> bool:
        return self._after(token_id) is not None

    def advance(self, token_id: int) -> None:
        after = self._after(token_id)
        if after is None:
            raise ValueError(f"token {token_id} does not continue the JSON object")
        self._state, self._pending = after
        self._checked = None

    def _after(self, token_id: int) -> tuple[State, bytes] | None:
        checked = self._checked
        if checked is not None and checked[0] == token_id:  # allows() then advance() checks once
            return checked[1]
        result = self._check(token_id)
        self._checked = (token_id, result)
        return result

    def _check(self, token_id: int) -> tuple[State, bytes] | None:
        entry = self._texts.get(token_id)
        if entry is None:  # a control token; end of generation once the object is complete
            return (self._state, self._pending) if self.complete and not self._pending else None
        raw, text, rest = entry
        if not raw:
            return None  # no progress: a model must not loop on empty tokens
        if self._pending:
            try:
                text, used = codecs.utf_8_decode(self._pending + raw, "strict", False)
            except UnicodeDecodeError:
                return None
            rest = (self._pending + raw)[used:]
        elif text is None:
            return None
        state = advance(self._state, text)
        if state is None or (rest and state[0] != STRING):
            return None  # characters outside ASCII belong inside strings only
        return state, rest
