"""Cheap, realistic-enough text: prose, Dart source, Markdown and dartdoc HTML.

Text is assembled by sampling lines from fixed pools built once per process. Sampling
whole lines keeps generation at C speed (``rng.choices`` + ``join``), which is what lets
the small instance build in seconds. The pools are large enough that a deflate window
rarely sees a repeated line, so the compression ratio stays code-like (about 3-4x)
instead of collapsing on repeats; the byte budgets in content.py depend on that ratio.
"""

from __future__ import annotations

import functools
import random
import re
from typing import Callable

_WORDS = (
    "able about access action adapter after again agent allow analyze android animate app "
    "apply archive array asset async attach audit auth backup badge banner base batch before "
    "binary bind blob block body border bound bridge browse buffer build bundle button cache "
    "call cancel canvas card cell change channel chart check child chunk class clear click "
    "client clip close cloud code color column command commit compile complete config connect "
    "const consume content context control convert copy count create cursor custom dart data "
    "date debug decode default defer delay delete depend design detail device dialog diff "
    "direct dispose divider domain draft drawer driver edit element empty enable encode entry "
    "error event expand export extend factory fetch field file filter final flag flutter focus "
    "font form frame future gesture global graph grid group guard handle hash header height "
    "hidden hint history host icon image import index inline input insert inspect install item "
    "join json key label layout lazy length level library limit line link list listen load "
    "local lock logger login main manage map margin match media memory menu merge message meta "
    "method mode model module mount native navigate network node notify null object observe "
    "offset option order output overlay package padding page paint panel parse patch path "
    "payload pending picker pixel platform plugin pointer policy popup port preview primary "
    "print profile provider proxy publish query queue radius range reader record redirect "
    "refresh region registry release remote render report request reset resolve resource "
    "response result retry return route runtime sample scaffold scale schema scope screen "
    "scroll search secure select semantic send server service session setting shadow shape "
    "sheet signal size slider snapshot socket sort source spacing stack state status storage "
    "store stream string style submit surface switch sync table target task template test "
    "text theme thread tile timer title toggle token tooltip track transform tree trigger type "
    "update upload user utility validate value vector version view visible wait watch widget "
    "width window worker wrap write yield zone"
).split()

_DART_TEMPLATES = (
    "  final %T _%i = %T(%i: %i);", "  %T get %i => _%i;", "  void %i(%T %i) {",
    "    if (%i == null) return;", "    _%i.%i(%i, %n);", "    return %T.%i(%i);",
    "  }", "  /// %s", "class %T extends %T {", "  const %T({required this.%i});",
    "  @override", "  Future<%T> %i() async {", "    await %i.%i();",
    "    final %i = <%T>[];", "    for (final %i in %i) {", "      %i.add(%i.%i);",
    "}", "", "    // %s", "  static const %i = %n;", "    throw %TError('%s');",
    "    %i = %i ?? %T.%i;", "  late final Map<String, %T> _%i = {};",
)

_HTML_TEMPLATES = (
    '<li><a href="%l/%T-class.html">%T</a></li>',
    '<dt id="%i" class="property"><span class="name"><a href="%l/%T/%i.html">%i</a></span>',
    "<dd><p>%s</p></dd>", '<div class="desc markdown"><p>%s</p></div>',
    '<section class="multi-line-signature"><span class="returntype">%T</span> '
    '<span class="name">%i</span>(<span class="parameter">%T %i</span>)</section>',
    '<pre class="language-dart"><code>%T %i = %T.%i(%n);</code></pre>',
    '<span class="signature">&#8594; %T</span>', '<p class="features">%s</p>',
    '<li class="inherited"><a href="%l/%T/%i.html">%i</a></li>',
)


def _ident(rng: random.Random, capital: bool) -> str:
    parts = rng.sample(_WORDS, rng.randint(1, 3))
    text = "".join(p.capitalize() for p in parts)
    return text if capital else text[0].lower() + text[1:]


def _sentence(rng: random.Random) -> str:
    words = rng.choices(_WORDS, k=rng.randint(6, 16))
    return " ".join(words).capitalize() + "."


_FIELDS: dict[str, Callable[[random.Random], str]] = {
    "T": lambda rng: _ident(rng, True),
    "i": lambda rng: _ident(rng, False),
    "n": lambda rng: str(rng.randint(0, 4096)),
    "s": _sentence,
    "l": lambda rng: _ident(rng, False).lower(),
}


def _fill(rng: random.Random, template: str) -> str:
    """Fill each ``%X`` placeholder independently; only the ones present are drawn."""
    parts = re.split(r"%([Tinsl])", template)
    return "".join(part if index % 2 == 0 else _FIELDS[part](rng) for index, part in enumerate(parts))


@functools.cache
def sentences() -> tuple[str, ...]:
    """Prose pool; fixed seed so every process agrees on it."""
    rng = random.Random(0x5E7)
    return tuple(_sentence(rng) for _ in range(6000))


@functools.cache
def dart_lines() -> tuple[str, ...]:
    """Dart-looking source lines."""
    rng = random.Random(0xDA27)
    return tuple(_fill(rng, rng.choice(_DART_TEMPLATES)) for _ in range(10000))


@functools.cache
def html_lines() -> tuple[str, ...]:
    """dartdoc-looking HTML lines."""
    rng = random.Random(0x47A1)
    return tuple(_fill(rng, rng.choice(_HTML_TEMPLATES)) for _ in range(10000))


@functools.cache
def _mean_length(pool: tuple[str, ...]) -> int:
    return max(1, round(sum(map(len, pool)) / len(pool)) + 1)


def _sample(rng: random.Random, pool: tuple[str, ...], nbytes: int, sep: str) -> str:
    count = max(1, nbytes // _mean_length(pool))
    return sep.join(rng.choices(pool, k=count))


def prose(rng: random.Random, nbytes: int) -> str:
    """About ``nbytes`` of sentences."""
    return _sample(rng, sentences(), nbytes, " ")


def dart_source(rng: random.Random, nbytes: int) -> str:
    """About ``nbytes`` of Dart-like lines."""
    return _sample(rng, dart_lines(), nbytes, "\n") + "\n"


def html_body(rng: random.Random, nbytes: int) -> str:
    """About ``nbytes`` of dartdoc-like HTML lines."""
    return _sample(rng, html_lines(), nbytes, "\n")


def words(rng: random.Random, count: int) -> list[str]:
    """Distinct vocabulary words, for names, topics and descriptions."""
    return rng.sample(_WORDS, count)
