"""The one redaction function and the text neutralisers, on every form of URL and text a user can write."""

from __future__ import annotations

import pytest

from services.safe_text import bidi_problem, markdown_code, markdown_text, plotly_text, redact_url, terminal_text

REDACTED = [
    ("redis://:sekrit@host:6379/0", "redis://:***@host:6379/0"),
    ("redis://user:sekrit@host/0", "redis://user:***@host/0"),
    ("redis://sekrit@host/0", "redis://***@host/0"),  # a lone token is a secret
    ("postgresql+psycopg://fit@db:5432/x", "postgresql+psycopg://fit@db:5432/x"),  # a role is not
    ("postgresql+psycopg://fit:p%40ss@db/x", "postgresql+psycopg://fit:***@db/x"),
    ("postgresql://u:pa/ss@db/x", "postgresql://u:***@db/x"),  # a "/" inside the password
    ("postgresql://u:p@ss@db/x", "postgresql://u:***@db/x"),  # an unescaped "@" inside it
    ("postgresql://u@db/x?password=sekrit&sslmode=require", "postgresql://u@db/x?password=***&sslmode=require"),
    ("postgresql://db/x?sslpassword=a;api_key=b&token=c&Secret=d", "postgresql://db/x?sslpassword=***;api_key=***"
                                                                   "&token=***&Secret=***"),
    ("https://h/p?X-Amz-Signature=abc&x=1", "https://h/p?X-Amz-Signature=***&x=1"),
    ("user:sekrit@host", "user:***@host"),  # not a URL at all
    ("sqlite:////tmp/a@b.db", "sqlite:////tmp/a@b.db"),
    ("redis://:se\x1bkrit@h/0\x1b[2J", "redis://:***@h/0\\x1b[2J"),
    ("file://u:sekrit@host/x", "file://u:***@host/x"),
]


@pytest.mark.parametrize(("url", "shown"), REDACTED)
def test_redact_url_hides_every_secret(url, shown):
    assert redact_url(url) == shown
    assert "sekrit" not in redact_url(url)


def test_terminal_text_shows_escapes_instead_of_acting_on_the_terminal():
    assert terminal_text("a\x1b[2Jb\x07\r\n\t\x9b\u202e\u2066c") == "a\\x1b[2Jb\\x07\\r\\n\\t\\x9b\\u202e\\u2066c"
    assert terminal_text("Ünïcødé 実験 👩\u200d🔬 مرحبا") == "Ünïcødé 実験 👩\u200d🔬 مرحبا"  # letters stay
    assert terminal_text(None) == ""


def test_bidi_problem_refuses_overrides_and_isolates_only():
    assert bidi_problem("name", "مرحبا بالعالم \u200f") is None  # right-to-left letters and marks are text
    assert bidi_problem("note", "a\u2067b") == ("note: contains the bidirectional control character U+2067 "
                                                "(right-to-left isolate), which makes text display in another "
                                                "order than it is stored; remove it")


def test_markdown_text_escapes_links_images_directives_and_html():
    shown = markdown_text("[x](http://e.example) ![i](u) **b** :red[r] <b> $x$ a@b.c - y")
    for raw in ("[x]", "](", "![", "**", ":red[", "<b>", "$x$"):
        assert raw not in shown
    assert "http\u2060\\://" in shown and "a\u2060\\@b" in shown  # no autolinks after the escapes are read
    assert markdown_text("- item").startswith("\\-") and markdown_text("widths-on-moons") == "widths-on-moons"


def test_markdown_code_and_plotly_text_cannot_be_broken_out_of():
    assert markdown_code("a`b") == "``a`b``"
    assert markdown_code("`x`") == "`` `x` ``"
    assert plotly_text("<a href='http://e'>x</a> & <b>") == "&lt;a href='http://e'&gt;x&lt;/a&gt; &amp; &lt;b&gt;"
