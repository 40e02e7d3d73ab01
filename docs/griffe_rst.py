"""Griffe extension for the API reference: the docstrings are written for Sphinx (``:class:`X```, ``:math:`x```,
``.. math::`` blocks); mkdocstrings renders Markdown. Roles become code spans (``~`` keeps the last name, as in
Sphinx) and math becomes ``pymdownx.arithmatex``'s ``$...$`` and ``$$...$$``, typeset by MathJax."""

import re
import textwrap

import griffe

ROLE = re.compile(r":(?:class|meth|func|data|attr|mod|exc|obj):`(~?)([^`]+)`")
MATH = re.compile(r":math:`([^`]+)`")


def _role(match: re.Match) -> str:
    name = match.group(2)
    return f"`{name.rsplit('.', 1)[-1] if match.group(1) else name}`"


def _math_blocks(text: str) -> str:
    """Each ``.. math::`` directive and the lines indented under it become one ``$$`` block."""
    lines, out = text.split("\n"), []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() != ".. math::":
            out.append(line)
            i += 1
            continue
        indent, body = line[:len(line) - len(line.lstrip())], []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        out += [indent + "$$", *textwrap.indent(textwrap.dedent("\n".join(body)).strip("\n"), indent).split("\n"),
                indent + "$$", ""]
    return "\n".join(out)


def markdown(text: str) -> str:
    text = _math_blocks(text)
    text = re.sub(r"(\S)::$", r"\1:", text, flags=re.M)  # "Example::" introduces a literal block in reST
    text = MATH.sub(lambda m: f"${m.group(1)}$", text)
    return ROLE.sub(_role, text)


class SphinxToMarkdown(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
