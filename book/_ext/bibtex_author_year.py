"""Sphinx extension: author-year labels in the reference list.

With ``bibtex_reference_style: author_year`` sphinxcontrib-bibtex cites in the text as "[Basu et al., 2021]",
but the labels of the reference list come from the pybtex formatting style, whose label styles are "alpha"
("[BPF21]") and "number" ("[1]"). This extension registers the pybtex formatting style ``author_year``: the
``plain`` style (entries sorted by author, year, title) with labels "Basu et al., 2021", "Koh and Liang, 2017",
i.e. what the text shows. Select it with ``bibtex_default_style: author_year``.

It also registers the referencing style ``author_year_upright`` (sphinxcontrib-bibtex's ``author_year`` with an
upright "et al." rather than an italic one, as plain-text labels in the list cannot be italic), selected with
``bibtex_reference_style: author_year_upright``; a citation then reads exactly as its label in the list.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle
from sphinxcontrib.bibtex.plugin import register_plugin as register_bibtex_plugin
from sphinxcontrib.bibtex.style.referencing import PersonStyle
from sphinxcontrib.bibtex.style.referencing.author_year import AuthorYearReferenceStyle


def _last_name(person) -> str:
    """The surname as sphinxcontrib-bibtex's "last" name style prints it (von part included, LaTeX removed)."""
    return Text.from_latex(" ".join(person.prelast_names + person.last_names)).render_as("text")


def author_year_label(entry) -> str:
    """ "Basu et al., 2021" (three or more authors), "Koh and Liang, 2017" (two), "Koh, 2017" (one)."""
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [_last_name(p) for p in persons]
    if not names:
        who = Text.from_latex(entry.fields.get("title", entry.key)).render_as("text")
    elif len(names) == 1:
        who = names[0]
    elif len(names) == 2:
        who = f"{names[0]} and {names[1]}"
    else:
        who = f"{names[0]} et al."
    return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearLabelStyle(BaseLabelStyle):
    """Author-year labels; equal labels get a, b, ... after the year so that every label stays unique."""

    def format_labels(self, sorted_entries):
        sorted_entries = list(sorted_entries)
        labels = [author_year_label(e) for e in sorted_entries]
        total = Counter(labels)
        seen: Counter = Counter()
        for label in labels:
            if total[label] > 1:
                seen[label] += 1
                yield label + "abcdefghijklmnopqrstuvwxyz"[seen[label] - 1]
            else:
                yield label


class AuthorYearStyle(PlainStyle):
    default_label_style = AuthorYearLabelStyle
    default_sorting_style = "author_year_title"


@dataclass
class UprightAuthorYearReferenceStyle(AuthorYearReferenceStyle):
    """``author_year`` citations with "et al." upright, as in the reference list's labels."""

    person: PersonStyle = field(default_factory=lambda: PersonStyle(other=" et al."))


register_plugin("pybtex.style.labels", "author_year", AuthorYearLabelStyle)
register_plugin("pybtex.style.formatting", "author_year", AuthorYearStyle)
register_bibtex_plugin("sphinxcontrib.bibtex.style.referencing", "author_year_upright", UprightAuthorYearReferenceStyle)


def setup(app):
    return {"parallel_read_safe": True, "parallel_write_safe": True}
