"""Generate docs/api.md, the API reference, from the docstrings of batchgap's public names.

    python scripts/api_docs.py            # write docs/api.md
    python scripts/api_docs.py --check    # exit 1 if docs/api.md is not what this script would write

The public names are ``batchgap.__all__`` plus ``batchgap.train.train``. Each gets its signature and its
docstring as written, grouped as below; a name in no group lands under "Other names", so a new export is
documented the moment it is added (move it into a group here). Only the standard library's ``inspect`` is
used; the output depends on the source alone (no memory addresses, no paths of this machine), so the test
in tests/test_api_docs.py can compare it with the committed file.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "api.md"
COMMAND = "python scripts/api_docs.py"

GROUPS: list[tuple[str, str, list[str]]] = [
    ("Studies", "A study file in, results and a report out: what the CLI's `run` and `report` call.",
     ["load_study", "StudyConfig", "run_study", "write_report"]),
    ("Training", "The one training loop and its settings.",
     ["train", "TrainConfig"]),
    ("Geometry", "Loss, curvature, sharpness and paths around a trained model; each restores the model bit for bit "
     "and returns its numbers with their protocol.",
     ["evaluate", "distance", "eps_sharpness", "adaptive_sharpness", "hessian_eigenvalues", "hessian_trace",
      "hessian_density", "filter_normalized_direction", "loss_curve", "loss_surface", "interpolate",
      "gradient_noise_scale", "exact_gradient_noise_scale"]),
    ("Objectives", "How a batch of any form becomes a loss: every measure's `objective=` (default: `(inputs, targets)` "
     "pairs and cross-entropy; or any callable `objective(model, batch) -> (loss_sum, weight)`).",
     ["Objective", "pair_objective", "tuple_objective", "huggingface_objective"]),
    ("Tracking", "Geometry measured from inside your own training loop (and the Lightning and Hugging Face callbacks "
     "over it, in `batchgap.integrations`): docs/track.md.",
     ["track"]),
    ("Generalization measures", "Norm- and flatness-based predictors of the generalization gap (Jiang et al. 2019).",
     ["norm_measures", "pac_bayes_flatness", "average_sharpness", "worst_case_flatness"]),
    ("Data and models", "Built-in data sets and networks.",
     ["load_dataset", "Dataset", "TensorData", "build_model", "init_model"]),
    ("Errors and version", "", ["UserError", "__version__"]),
]


def public_names() -> dict[str, object]:
    """``{name: object}`` for every public name: ``batchgap.__all__`` and ``batchgap.train.train``."""
    import batchgap
    import batchgap.train

    names = {name: getattr(batchgap, name) for name in batchgap.__all__}
    names["train"] = batchgap.train.train
    return names


def _default(value) -> str:
    """A default value as source-like text, never with a memory address."""
    if inspect.isfunction(value) or inspect.isbuiltin(value):
        name = getattr(value, "__qualname__", getattr(value, "__name__", "function"))
        if name == "<lambda>":
            return "lambda ..."
        module = getattr(value, "__module__", None)
        return f"{module}.{name}" if module else name
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    text = repr(value)
    return text if " at 0x" not in text else type(value).__name__ + "(...)"


def _annotation(annotation) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def signature(name: str, obj) -> str:
    """``name(param: annotation = default, ...) -> return``, one parameter a line when long."""
    try:
        sig = inspect.signature(obj)
    except ValueError:  # a class whose constructor is a builtin's (an exception): no Python signature
        return f"{name}(...)"
    parts, previous = [], None
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and previous not in (p.KEYWORD_ONLY, p.VAR_POSITIONAL):
            parts.append("*")
        if previous is p.POSITIONAL_ONLY and p.kind is not p.POSITIONAL_ONLY:
            parts.append("/")
        star = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        text = star + p.name
        if p.annotation is not p.empty:
            text += ": " + _annotation(p.annotation)
        if p.default is not p.empty:
            text += (" = " if p.annotation is not p.empty else "=") + _default(p.default)
        parts.append(text)
        previous = p.kind
    empty = sig.return_annotation is sig.empty or inspect.isclass(obj)
    ret = "" if empty else " -> " + _annotation(sig.return_annotation)
    one_line = f"{name}({', '.join(parts)}){ret}"
    if len(one_line) <= 100:
        return one_line
    return f"{name}(\n" + "".join(f"    {part},\n" for part in parts) + f"){ret}"


def _source(obj) -> str:
    try:
        path = Path(inspect.getsourcefile(inspect.unwrap(obj))).resolve()
    except TypeError:
        return ""
    for parent in path.parents:
        if parent.name == "src":
            return path.relative_to(parent.parent).as_posix()
    return path.name


def docstring(obj) -> str:
    """The object's own docstring, cleaned; "" for none (a dataclass's generated ``Name(...)`` is none)."""
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and doc.startswith(obj.__name__ + "("):
        return ""
    return doc


def _summary(doc: str) -> str:
    first = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in first.splitlines()).replace("|", "\\|")


def _anchor(name: str) -> str:
    """GitHub's anchor for the heading ``### `name` ``: lower case, word characters kept (underscores too)."""
    return name.lower()


def entry(name: str, obj) -> list[str]:
    """The markdown section of one public name."""
    lines = [f"### `{name}`", ""]
    if name == "__version__":
        return lines + ["The installed version of batchgap, a string (``batchgap.version``).", ""]
    kind = "class" if inspect.isclass(obj) else "function"
    source = _source(obj)
    lines += [f"*{kind}*" + (f", defined in `{source}`" if source else ""), "", "```python",
              ("class " if kind == "class" else "") + signature(name, obj), "```", ""]
    doc = docstring(obj)
    lines += ["```text", doc, "```", ""] if doc else ["(no docstring)", ""]
    return lines


def render() -> str:
    """The text of docs/api.md."""
    names = public_names()
    grouped = [(title, blurb, [n for n in members if n in names]) for title, blurb, members in GROUPS]
    placed = {n for _, _, members in grouped for n in members}
    rest = sorted(n for n in names if n not in placed)
    if rest:
        grouped.append(("Other names", "Not yet placed in a group of scripts/api_docs.py.", rest))
    out = ["# API reference", "",
           f"Generated from the docstrings by `{COMMAND}`; do not edit by hand (tests/test_api_docs.py fails when",
           "this file is out of date). The names a notebook user imports: `from batchgap import ...`, and",
           "`from batchgap.train import train`. docs/measures.md explains what the measures compute.", ""]
    out += ["| name | group | summary |", "|---|---|---|"]
    for title, _, members in grouped:
        for n in members:
            doc = docstring(names[n]) if n != "__version__" else "The installed version of batchgap."
            out.append(f"| [`{n}`](#{_anchor(n)}) | {title} | {_summary(doc or '')} |")
    out.append("")
    for title, blurb, members in grouped:
        out += [f"## {title}", ""] + ([blurb, ""] if blurb else [])
        for n in members:
            out += entry(n, names[n])
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate docs/api.md from batchgap's docstrings.")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"docs/api.md is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
