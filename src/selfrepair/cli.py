"""Command line: ``selfrepair book``, ``selfrepair measure``, ``selfrepair sweep``, ``selfrepair models``,
``selfrepair student`` and ``selfrepair fetch-js``.

Parameter names are the notebooks' (each chapter's config fields); ``--tokens`` is ``n_tokens``.
The precedence for the book is: notebook defaults < ``--profile`` (its per-chapter ``chapters:``
entries over its common ones) < flags (``--model``, ``--param name=value``, ...); ``cache_dir`` is
resolved here (default: ``results/`` at the root) and each notebook runs from the book's root, so
the book shows it relative to the root (``cache_dir = "results"``), not as a path of this machine. Every
chapter's parameters are checked before the first chapter runs. A run stopped with Ctrl-C or
SIGTERM saves its last finished batch and exits with 130 / 143 and a line saying how to resume.

This module imports nothing heavy: ``--help`` and a rejected argument answer without torch,
transformers or nnsight (tests/test_cli.py). Each subcommand is a ``cmd_<name>(args)`` function,
listed in :data:`COMMANDS`, that imports what it runs inside its body.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .errors import SelfRepairError

FLAGS = {"model": "model", "dataset": "dataset", "tokens": "n_tokens", "seq_len": "seq_len",
         "packing": "packing",
         "batch_size": "batch_size", "device": "device", "dtype": "dtype", "ablation": "ablation",
         "top_percent": "top_percent", "seed": "seed", "remote": "remote",
         "fold_value_biases": "fold_value_biases"}


def _param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param takes name=value, got {text!r}")
    name, value = text.split("=", 1)
    return name.strip(), yaml.safe_load(value)  # "512" -> 512, "null" -> None, "[L1H2]" -> list


def _whole(least: int):
    """An argparse type: a whole number >= ``least`` (the bounds the chapters' configs check)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    return parse


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"must be in (0, 100], got {value:g}")
    return value


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="hub id, local directory, gemma-3-270m or tiny-<family>")
    p.add_argument("--dataset", help="embedded, tiny, a local file/dir or a hub dataset id")
    p.add_argument("--tokens", type=_whole(1), help="tokens measured (n_tokens)")
    p.add_argument("--seq-len", type=_whole(2), dest="seq_len")
    p.add_argument("--packing", choices=("document", "concatenate"),
                   help="rows from the corpus: 'document' (each row a window of its own document, the "
                        "default) or 'concatenate' (documents joined and cut into rows, the paper's code)")
    p.add_argument("--batch-size", type=_whole(1), dest="batch_size")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", help="float32, bfloat16, float64 (default: float32)")
    p.add_argument("--top-percent", type=_percent, dest="top_percent")
    p.add_argument("--seed", type=_whole(0))
    p.add_argument("--fold-value-biases", action="store_true", default=None, dest="fold_value_biases",
                   help="TransformerLens's convention, which the paper's code used: each b_V @ W_O "
                        "moved into the layer's output bias (the paper profile sets it)")
    p.add_argument("--remote", nargs="?", const="ndif", choices=("ndif", "local"),
                   help="run every forward pass through nnsight's remote path: on NDIF (bare "
                        "--remote; API key from NDIF_API_KEY or nnsight's config) or 'local' (its "
                        "in-process simulation)")


def _add_book_flags(p: argparse.ArgumentParser, chapters_note: str) -> None:
    """What chooses the book's measurements: a profile, run flags, parameters, chapters, the cache."""
    p.add_argument("--profile", help="tiny (tests), cpu (the embedded default), paper (GPU) or a .yaml")
    _add_run_flags(p)
    p.add_argument("--ablation", help="resample, mean or zero")
    p.add_argument("--param", "-p", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="any other notebook parameter (YAML value), repeatable")
    p.add_argument("--chapters", nargs="+", metavar="NN", help=f"only these chapters (e.g. 01 03); {chapters_note}")
    p.add_argument("--cache-dir", type=Path, help="results cache (default: results/ at the root)")
    p.add_argument("--root", type=Path, help="the book's root (default: found from the cwd)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="selfrepair", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("book", help="execute the chapters with papermill and build the HTML book")
    _add_book_flags(b, "others keep their earlier executed copies")
    b.add_argument("--out", type=Path, help="build folder (default: book/_build)")
    b.add_argument("--jobs", "-j", type=_whole(1), default=1, help="chapters executed at once")
    b.add_argument("--no-strict", dest="strict", action="store_false",
                   help="do not treat Sphinx warnings as errors")
    b.add_argument("--no-execute", dest="execute", action="store_false",
                   help="only rebuild the HTML from the executed notebooks already there")
    b.add_argument("--no-build", dest="build", action="store_false", help="only execute")

    m = sub.add_parser("measure", help="compute the chapters' measurements into the results cache, "
                       "without papermill (a GPU box, torchrun); `selfrepair book` with the same "
                       "parameters then reads them")
    _add_book_flags(m, "default: every chapter")

    s = sub.add_parser("sweep", help="the cached all-heads self-repair sweep (selfrepair.experiment)")
    _add_run_flags(s)
    s.add_argument("--ablation", default="resample", help="resample, mean or zero")
    s.add_argument("--out", type=Path, default=Path("results"), help="results cache directory")

    sub.add_parser("models", help="list the supported model types, what each family's adapter does "
                                  "differently, and the known limits")
    t = sub.add_parser("student", help="write the chapter notebooks with the exercise solutions "
                       "stripped (stubs in their place), for a course to hand out")
    t.add_argument("--out", type=Path, default=Path("student"), help="folder to write (default: student/)")
    t.add_argument("--chapters", nargs="+", metavar="NN", help="only these chapters (e.g. 01 03)")
    t.add_argument("--root", type=Path, help="the book's root (default: found from the cwd)")

    f = sub.add_parser("fetch-js", help="write the offline vega bundle and MathJax into book/_static/vendor")
    f.add_argument("--root", type=Path)
    f.add_argument("--force", action="store_true", help="rewrite even if up to date")
    return ap


def _flags(args: argparse.Namespace) -> dict:
    return {name: getattr(args, flag) for flag, name in FLAGS.items()
            if getattr(args, flag, None) is not None}


def _book_params(args: argparse.Namespace, root: Path) -> tuple[dict, dict]:
    """The book's parameters (profile < flags, ``cache_dir`` resolved) and per-chapter overrides."""
    from .book import chapter_notebooks, load_profile

    profile = load_profile(args.profile, root)
    chapter_notebooks(root, args.chapters)  # an unknown chapter fails here, before torch is imported
    per_chapter = profile.pop("chapters", {})
    flags = {**_flags(args), **dict(args.param)}
    per_chapter = {k: {n: v for n, v in over.items() if n not in flags} for k, over in per_chapter.items()}
    params = {**profile, **flags}
    params["cache_dir"] = str((args.cache_dir or root / "results").resolve())
    return params, per_chapter


def cmd_book(args: argparse.Namespace) -> int:
    from .book import find_root

    root = find_root(args.root)
    params, per_chapter = _book_params(args, root)
    from .book import run_book
    from .distributed import launched

    if launched():
        raise SelfRepairError("`selfrepair book` runs its chapters in papermill kernels and does not shard: "
                              "precompute the measurements with `torchrun --nproc-per-node N -m "
                              "selfrepair.cli measure ...` (same parameters), then run the book once, "
                              "without torchrun; it reads those cache entries")
    return run_book(root, args.out or root / "book" / "_build", params=params, per_chapter=per_chapter,
                    chapters=args.chapters, jobs=args.jobs, strict=args.strict,
                    execute=args.execute, build=args.build)


def cmd_measure(args: argparse.Namespace) -> int:
    import os

    from .book import find_root

    root = find_root(args.root)
    params, per_chapter = _book_params(args, root)
    from .book.precompute import measure_chapters
    from .distributed import close

    try:
        done = measure_chapters(root, params, per_chapter, args.chapters)
    finally:
        close()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"measured {len(done)} chapter(s) ({', '.join(done)}) into {params['cache_dir']}: `selfrepair "
              "book` with the same parameters reads these results without computing them again")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .chapters import check
    from .chapters.existence import Config
    from .experiment import measure, open_model, open_tokens, sweep_spec
    from .measure import Cache

    cfg = Config.from_params(**{"ablation": "resample", **_flags(args)}, cache_dir=str(args.out))
    check(cfg)  # the model, the corpus and the shapes, before the first forward pass
    from .distributed import close, world

    model, data, spec = open_model(cfg), open_tokens(cfg, open_model(cfg)), sweep_spec(cfg, cfg.ablation)
    try:
        sweep = measure(cfg, spec, data)  # under torchrun: sharded over the ranks, written by rank 0
        if world(model.device).main:
            print(sweep.per_head().to_string(index=False, max_rows=40))
            print(f"cached as {Cache(cfg.cache_dir).path(spec, model, data).resolve()}")
    finally:
        close()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models.adapters import families_text

    print(families_text())
    return 0


def cmd_student(args: argparse.Namespace) -> int:
    from .book import chapter_notebooks, find_root

    notebooks = chapter_notebooks(find_root(args.root), args.chapters)  # before torch is imported
    from .exercises.student import export

    written = export(notebooks, args.out)
    print(f"{len(written)} student notebooks in {args.out}/ (solutions stripped; run them with the "
          "selfrepair package installed)")
    return 0


def cmd_fetch_js(args: argparse.Namespace) -> int:
    from .book import find_root, vendor_assets

    root = find_root(args.root)
    versions = vendor_assets(root / "book" / "_static", root / ".cache" / "npm", force=args.force)
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    return 0


# subcommand -> its function (the parser's subcommands in parser(), same names)
COMMANDS = {"book": cmd_book, "measure": cmd_measure, "sweep": cmd_sweep, "models": cmd_models, "student": cmd_student,
            "fetch-js": cmd_fetch_js}


def main(argv: list[str] | None = None) -> int:
    from .interrupt import Interrupted

    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SelfRepairError as e:
        print(f"selfrepair {args.command}: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"selfrepair {args.command}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
