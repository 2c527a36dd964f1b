"""Safe parser for per-layer window patterns such as ``"([128]*3+[16768]*1)*9"``.

The official template runs ``eval()`` on this config value, which executes any
code a checkpoint's config.json carries. The grammar is tiny, so it is parsed
here instead: non-negative integers, lists of them, ``+`` and ``*`` with
Python's meaning on ints and lists, and parentheses. Anything else is an error.
"""

import re

MAX_PATTERN_CHARS = 4096
# Bounds the work a hostile pattern such as "[1]*10**9" could ask for.
MAX_LIST_LEN = 1 << 16
MAX_INT = 1 << 40
MAX_DEPTH = 32  # parentheses deep enough to overflow Python's stack are refused

_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")


class PatternError(ValueError):
    pass


def _tokens(text):
    out = []
    for m in _TOKEN.finditer(text):
        number, sym = m.groups()
        if number is not None:
            out.append(int(number))
        elif sym in "[](),+*":
            out.append(sym)
        elif not sym.isspace():
            raise PatternError(f"unexpected character {sym!r} in window pattern {text!r}")
    return out


class _Parser:
    # expr := term ('+' term)* ; term := atom ('*' atom)* ;
    # atom := INT | '(' expr ')' | '[' [expr (',' expr)*] [','] ']'
    def __init__(self, text):
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    def fail(self, why):
        raise PatternError(f"invalid window pattern {self.text!r}: {why}")

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, tok):
        if self.peek() != tok:
            self.fail(f"expected {tok!r}")
        self.i += 1

    def parse(self):
        value = self.expr()
        if self.peek() is not None:
            self.fail(f"unexpected {self.peek()!r}")
        return value

    def expr(self):
        value = self.term()
        while self.peek() == "+":
            self.i += 1
            rhs = self.term()
            if isinstance(value, list) != isinstance(rhs, list):
                self.fail("'+' needs two ints or two lists")
            value = self.check(value + rhs)
        return value

    def term(self):
        value = self.atom()
        while self.peek() == "*":
            self.i += 1
            rhs = self.atom()
            if isinstance(value, list) and isinstance(rhs, list):
                self.fail("cannot multiply two lists")
            n = value if isinstance(rhs, list) else rhs
            if isinstance(value, list) or isinstance(rhs, list):
                if n * max(len(value if isinstance(value, list) else rhs), 1) > MAX_LIST_LEN:
                    self.fail(f"list longer than {MAX_LIST_LEN}")
            value = self.check(value * rhs)
        return value

    def atom(self):
        tok = self.peek()
        if isinstance(tok, int):
            self.i += 1
            return self.check(tok)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"nested deeper than {MAX_DEPTH}")
        value = self.group(tok)
        self.depth -= 1
        return value

    def group(self, tok):
        if tok == "(":
            self.i += 1
            value = self.expr()
            self.take(")")
            return value
        if tok == "[":
            self.i += 1
            items = []
            while self.peek() != "]":
                item = self.expr()
                if isinstance(item, list):
                    self.fail("lists must hold integers")
                items.append(item)
                if self.peek() == ",":
                    self.i += 1
                elif self.peek() != "]":
                    self.fail("expected ',' or ']'")
            self.i += 1
            return items
        self.fail("expected an integer, '(' or '['" if tok is not None else "unexpected end")

    def check(self, value):
        if isinstance(value, list):
            if len(value) > MAX_LIST_LEN:
                self.fail(f"list longer than {MAX_LIST_LEN}")
        elif value > MAX_INT:
            self.fail(f"integer larger than {MAX_INT}")
        return value


def parse_windows(value, num_layers):
    """Per-layer windows (in chunks) from an int, a list, or a pattern string."""
    if isinstance(value, str):
        if len(value) > MAX_PATTERN_CHARS:
            raise PatternError(f"window pattern longer than {MAX_PATTERN_CHARS} characters")
        value = _Parser(value).parse()
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise PatternError(
            f"summary_sliding_chunk_num must be an int, a list or a pattern string, got {value!r}"
        )
    if isinstance(value, int):
        # A config could ask for 10**9 layers; the same bound as a pattern's lists.
        if num_layers > MAX_LIST_LEN:
            raise PatternError(f"num_hidden_layers {num_layers} is more than {MAX_LIST_LEN}")
        value = [value] * num_layers
    if len(value) != num_layers:
        raise PatternError(
            f"summary_sliding_chunk_num gives {len(value)} windows for {num_layers} layers"
        )
    for w in value:
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise PatternError(f"window sizes must be non-negative integers, got {w!r}")
    return list(value)
