"""Text that reaches a person: URLs without their secrets, user text without escape sequences.

- :func:`redact_url`: THE one function for every place a URL is shown (banners, errors, logs).
- :func:`terminal_text`: user text (names, notes, tags, submitters, worker names) made safe for a
  terminal: control characters (ANSI/OSC escapes, carriage returns, line breaks) and bidirectional
  overrides are shown as visible escapes such as ``\\x1b`` instead of acting on the terminal.
- :func:`bidi_problem`: the sentence refusing bidirectional-override characters at input; they can
  make text read in another order than it is stored (a name whose line reads backwards).
"""

from __future__ import annotations

import html
import re
import unicodedata

# Embeddings, overrides and isolates (LRE RLE PDF LRO RLO, LRI RLI FSI PDI). Plain right-to-left
# letters and the LRM/RLM marks are ordinary text and stay welcome.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Query-string keys whose values are secrets (compared lower-case, also as a part of a longer key).
_SECRET_KEY_PARTS = ("pass", "pwd", "secret", "token", "key", "auth", "credential", "signature", "sig")
_NO_AUTHORITY_SCHEMES = ("sqlite",)  # its path may hold an "@"
_USER_NAME_SCHEMES = ("postgresql", "postgres")  # a lone user info is a role name there, not a token


def redact_url(url: str) -> str:
    """``url`` with every secret replaced by ``***`` and odd characters shown as escapes.

    Secrets: the password of the user info (``user:***@host``; a lone ``token@host`` becomes
    ``***@host`` except in PostgreSQL URLs, where it is the role), and the value of every
    query-string parameter whose name says password, token, secret, key and the like
    (``?sslpassword=***``). Works on text that is not a valid URL too.
    """
    url = str(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    head, qmark, query = rest.partition("?")
    if scheme.split("+")[0].lower() not in _NO_AUTHORITY_SCHEMES and "@" in head:
        creds, _, after = head.rpartition("@")
        user, colon, _password = creds.partition(":")
        if colon:
            head = f"{user}:***@{after}"
        elif scheme.split("+")[0].lower() not in _USER_NAME_SCHEMES:
            head = f"***@{after}"
    if qmark:
        query = re.sub(r"(^|[&;])([^=&;#]*)=([^&;#]*)",
                       lambda m: f"{m[1]}{m[2]}={'***' if _is_secret_key(m[2]) else m[3]}", query)
    return terminal_text(f"{scheme}{sep}{head}{qmark}{query}")


def _is_secret_key(key: str) -> bool:
    key = key.lower()
    return any(part in key for part in _SECRET_KEY_PARTS)


def _is_unsafe(char: str) -> bool:
    return char in BIDI_CONTROLS or unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") and char not in "\u200d"


def terminal_text(text: object) -> str:
    """``text`` as one line a terminal shows literally: control, format and line/paragraph
    separator characters become visible escapes (``\\x1b``, ``\\n``, ``\\u202e``). The zero-width
    joiner stays, for emoji sequences."""
    text = "" if text is None else str(text)
    if not any(_is_unsafe(char) for char in text):
        return text
    return "".join(_escape(char) if _is_unsafe(char) else char for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if char in named:
        return named[char]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def bidi_problem(field: str, text: str | None) -> str | None:
    """One sentence refusing ``text`` for ``field`` when it holds a bidirectional override, else None."""
    if not text:
        return None
    found = next((char for char in text if char in BIDI_CONTROLS), None)
    if found is None:
        return None
    return (f"{field}: contains the bidirectional control character U+{ord(found):04X} "
            f"({unicodedata.name(found, 'unnamed').lower()}), which makes text display in another order "
            "than it is stored; remove it")


# Characters with a meaning anywhere in a line; "-" and "+" only start a list, so they are
# escaped only there (one line of text has one start), keeping names like widths-on-moons readable.
_MARKDOWN_SPECIAL = frozenset("\\`*_[]{}()#!:<>|~$&@.")
WORD_JOINER = "\u2060"
_NOT_A_LINK = re.compile(r"(?i)(\w)(:/|@)|\b(www)(\.)")


def markdown_text(text: object) -> str:
    """``text`` that Streamlit's Markdown (st.markdown, st.caption, st.warning, st.subheader ...)
    shows as itself: Markdown, directive (``:red[...]``, ``:material/x:``), math and HTML characters
    backslash-escaped, a list marker at its start escaped, and control and bidirectional characters
    shown as escapes, so it stays one line."""
    # Streamlit links URLs and e-mail addresses found in the text AFTER Markdown escapes are read, so
    # an invisible word joiner goes where they would start to match: "http⁠://", "www⁠.", "a@⁠b".
    text = _NOT_A_LINK.sub(lambda m: (m[1] or m[3]) + WORD_JOINER + (m[2] or m[4]), terminal_text(text))
    escaped = "".join(f"\\{char}" if char in _MARKDOWN_SPECIAL else char for char in text)
    return re.sub(r"^(\s*)([-+])", r"\1\\\2", escaped)


def markdown_code(text: object) -> str:
    """``text`` as an inline code span shown literally: its backtick fence is longer than any run of
    backticks inside, and control and bidirectional characters are shown as escapes."""
    text = terminal_text(text)
    fence = "`" * (1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    padded = f" {text} " if text.startswith("`") or text.endswith("`") else text
    return f"{fence}{padded}{fence}"


def plotly_text(text: object) -> str:
    """``text`` for a Plotly label, title or legend, shown literally: Plotly reads a few HTML tags
    (``<a href>``, ``<b>``, ``<br>``) and entities in labels, so ``&``, ``<`` and ``>`` become entities."""
    return html.escape(terminal_text(text), quote=False)
