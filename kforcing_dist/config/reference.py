"""Generate the config reference (``docs/config.md``) from the schema's field docs.

``python -m kforcing_dist.config.reference`` prints it; ``--update docs/config.md`` rewrites the
part of that page between the BEGIN/END markers (a test checks it is current).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from .loader import type_name
from .schema import Config

BEGIN = "<!-- BEGIN CONFIG REFERENCE (generated: make config-docs) -->"
END = "<!-- END CONFIG REFERENCE -->"


def _rows(cls, prefix: str):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _rows(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        doc = f.metadata.get("doc", "")
        if choices:
            doc += " One of: " + ", ".join(f"`{c}`" for c in choices) + "."
        yield f"| `{prefix}{f.name}` | {type_name(tp)} | `{default!r}` | {doc} |"


def reference_markdown() -> str:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines += list(_rows(Config, ""))
    return "\n".join(lines)


def updated_page(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise ValueError(f"the page lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{reference_markdown()}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--update", metavar="PAGE", help="rewrite the reference inside this file (docs/config.md)")
    args = parser.parse_args()
    if args.update:
        path = Path(args.update)
        path.write_text(updated_page(path.read_text()))
    else:
        print(reference_markdown())


if __name__ == "__main__":
    main()
